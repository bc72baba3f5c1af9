//! Paths a requester may name: parameters of type `path` and the files the
//! shipped `serve-static` service answers. Both stay inside a root: no
//! absolute path, no `..`, no hidden component, and no symlink that leads
//! out of the root.

use std::path::{Component, Path, PathBuf};

/// `text` as a path relative to a root: only normal components (`.` is
/// dropped), none hidden, no NUL. `None` for anything else, including an
/// absolute path (which `Path::join` would let replace the root).
pub fn relative_path(text: &str) -> Option<PathBuf> {
    if text.contains('\0') || text.contains('\\') {
        return None;
    }
    let mut out = PathBuf::new();
    for c in Path::new(text).components() {
        match c {
            Component::Normal(n) if !n.to_string_lossy().starts_with('.') => out.push(n),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

/// The file or directory `rel` names under `root` (a canonical path), if it
/// exists and, symlinks resolved, is still under `root`.
pub fn resolve(root: &Path, rel: &str) -> Option<PathBuf> {
    let p = std::fs::canonicalize(root.join(relative_path(rel)?)).ok()?;
    p.starts_with(root).then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_the_root() {
        for ok in ["", ".", "a", "a/b", "./a/b/"] {
            assert!(relative_path(ok).is_some(), "{ok:?}");
        }
        for bad in [
            "/",
            "/etc/re6stnet/node.key",
            "..",
            "a/../..",
            "a/..",
            ".ssh",
            "a/.hidden",
            "a\0b",
            "..\\x",
        ] {
            assert_eq!(relative_path(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn symlinks_out_of_the_root_are_refused() {
        let base = std::env::temp_dir().join(format!("orch-static-{}", std::process::id()));
        let root = base.join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(root.join("sub/f"), b"x").unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(base.join("secret"), b"k").unwrap_or_else(|e| panic!("{e}"));
        let _ = std::os::unix::fs::symlink(base.join("secret"), root.join("out"));
        let _ = std::os::unix::fs::symlink(root.join("sub/f"), root.join("in"));
        let root = std::fs::canonicalize(&root).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(resolve(&root, "sub/f"), Some(root.join("sub/f")));
        assert_eq!(resolve(&root, "in"), Some(root.join("sub/f")));
        assert_eq!(resolve(&root, ""), Some(root.clone()));
        assert_eq!(resolve(&root, "out"), None, "symlink out of the root");
        // What axum hands over for GET /%2Fetc%2Fpasswd.
        assert_eq!(resolve(&root, "/etc/passwd"), None);
        assert_eq!(resolve(&root, "../secret"), None);
        assert_eq!(resolve(&root, "missing"), None);
        let _ = std::fs::remove_dir_all(base);
    }
}
