//! Prometheus text exposition (format 0.0.4), the one writer the
//! registry, the node and the orchestration master share.

use std::fmt::Write as _;

/// A metric family's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (until a restart).
    Counter,
    /// Goes up and down.
    Gauge,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
        }
    }
}

/// `{k="v",...}` with the values escaped (empty for no labels).
pub fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    format!("{{{}}}", inner.join(","))
}

/// A page of metric families.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// An empty page.
    pub fn new() -> Self {
        Self::default()
    }

    /// One family: its help and type lines, then each sample (labels as
    /// [`labels`] makes them, value).
    pub fn family(
        &mut self,
        name: &str,
        kind: Kind,
        help: &str,
        samples: impl IntoIterator<Item = (String, f64)>,
    ) {
        let _ = writeln!(
            self.out,
            "# HELP {name} {help}\n# TYPE {name} {}",
            kind.name()
        );
        for (l, v) in samples {
            let _ = writeln!(self.out, "{name}{l} {v}");
        }
    }

    /// One family of a single unlabelled sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: f64) {
        self.family(name, kind, help, [(String::new(), value)]);
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render_with_escaped_labels() {
        let mut e = Exposition::new();
        e.family(
            "re6st_x_total",
            Kind::Counter,
            "Things.",
            [(labels(&[("reason", "a\"b\\c\nd")]), 2.0)],
        );
        e.single("re6st_y", Kind::Gauge, "One.", 1.5);
        assert_eq!(
            e.finish(),
            "# HELP re6st_x_total Things.\n# TYPE re6st_x_total counter\nre6st_x_total{reason=\"a\\\"b\\\\c\\nd\"} 2\n\
             # HELP re6st_y One.\n# TYPE re6st_y gauge\nre6st_y 1.5\n"
        );
        assert_eq!(labels(&[]), "");
    }
}
