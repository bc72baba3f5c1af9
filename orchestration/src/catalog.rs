//! A catalogue: the directory of service descriptors (`*.toml`) installed
//! on a machine. The master reads one to check requests; each agent reads
//! its own, and runs only what its own catalogue describes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::descriptor::Descriptor;

/// The descriptors of a directory, by software name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Catalog {
    /// Software name → (file, descriptor text, descriptor).
    entries: BTreeMap<String, (PathBuf, String, Descriptor)>,
}

impl Catalog {
    /// Reads every `*.toml` of `dir`. A file that does not parse, or two
    /// files for one software, refuse the whole catalogue, naming the file.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading the catalogue {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        files.sort();
        let mut entries: BTreeMap<String, (PathBuf, String, Descriptor)> = BTreeMap::new();
        for f in files {
            let text =
                std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
            let d =
                Descriptor::parse(&text).with_context(|| format!("descriptor {}", f.display()))?;
            if let Some((other, _, _)) = entries.get(&d.name) {
                bail!(
                    "descriptor {}: software {:?} is already described by {}",
                    f.display(),
                    d.name,
                    other.display()
                );
            }
            entries.insert(d.name.clone(), (f, text, d));
        }
        Ok(Self { entries })
    }

    /// The descriptor of `software`.
    pub fn get(&self, software: &str) -> Option<&Descriptor> {
        self.entries.get(software).map(|(_, _, d)| d)
    }

    /// Each descriptor's text, by name.
    pub fn texts(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries
            .iter()
            .map(|(name, (_, text, _))| (name.as_str(), text.as_str()))
    }

    /// Software names.
    pub fn names(&self) -> Vec<&str> {
        self.entries.keys().map(String::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Why loading `dir` fails (empty if it does not).
    fn load_error(dir: &Path) -> String {
        Catalog::load(dir)
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default()
    }

    #[test]
    fn a_bad_or_doubled_descriptor_refuses_the_catalogue() {
        let dir = std::env::temp_dir().join(format!("orch-catalog-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let write =
            |f: &str, t: &str| std::fs::write(dir.join(f), t).unwrap_or_else(|e| panic!("{e}"));
        write(
            "a.toml",
            "name = \"a\"\nversion = 2\ncommand = [\"true\"]\n",
        );
        write("notes.txt", "not a descriptor");
        let c = Catalog::load(&dir).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(c.names(), ["a"]);
        assert_eq!(c.get("a").map(|d| d.version), Some(2));
        write("b.toml", "name = \"a\"\ncommand = [\"false\"]\n");
        let e = load_error(&dir);
        assert!(
            e.contains("b.toml") && e.contains("already described"),
            "{e}"
        );
        write("b.toml", "name = \"b\"\ncommand = [\"{x}\"]\n");
        let e = load_error(&dir);
        assert!(e.contains("b.toml") && e.contains("{x}"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(Catalog::load(&dir).is_err(), "a missing directory");
    }
}
