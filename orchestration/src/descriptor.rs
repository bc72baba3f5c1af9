//! Service descriptors: what a software is, in a small TOML file.
//!
//! ```toml
//! name = "http-static"
//! version = 1
//! description = "A static HTTP file server"
//! command = ["python3", "-m", "http.server", "--bind", "{address}", "{port}"]
//!
//! [parameters.port]
//! type = "port"
//! default = 8080
//!
//! [[promises]]
//! http = "http://[{address}]:{port}/"
//! period_s = 5
//!
//! [connection]
//! url = "http://[{address}]:{port}/"
//! ```
//!
//! Placeholders `{NAME}` in the command, the environment, promises and
//! connection parameters are parameters of the descriptor or the built-ins
//! `address` (the instance's own overlay address), `instance` (the instance name)
//! and `dir` (its working directory). A descriptor that uses an unknown
//! placeholder, declares a default of the wrong type or has unknown keys is
//! refused when loaded, not when an instance starts.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Built-in placeholders every descriptor may use.
pub const BUILTINS: [&str; 3] = ["address", "instance", "dir"];

/// Why a descriptor or a request's parameters were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DescriptorError {
    /// Not TOML of the expected shape.
    #[error("{0}")]
    Syntax(String),
    /// A rule of the descriptor is broken.
    #[error("{0}")]
    Invalid(String),
    /// A requested parameter is unknown or of the wrong type.
    #[error("parameter {name}: {reason}")]
    Parameter {
        /// The parameter.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

/// Type of a parameter.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ParamType {
    /// Any text (no newlines).
    String,
    /// A whole number.
    Integer,
    /// A TCP/UDP port, 1..=65535.
    Port,
    /// true or false.
    Bool,
    /// A path inside the instance directory: relative, without `..`
    /// (symlinks out of it are refused where the path is used).
    Path,
}

/// A declared parameter.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Param {
    /// Its type.
    #[serde(rename = "type")]
    pub kind: ParamType,
    /// Default (none: the request must give it).
    pub default: Option<toml::Value>,
    /// What it is for.
    pub description: Option<String>,
}

/// A health check.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Promise {
    /// An HTTP URL that must answer 2xx.
    pub http: Option<String>,
    /// A command that must exit 0.
    pub command: Option<Vec<String>>,
    /// Seconds between checks.
    #[serde(default = "default_period")]
    pub period_s: u64,
    /// Failures in a row before the instance is reported failing.
    #[serde(default = "default_failures")]
    pub failures: u32,
}

fn default_version() -> u32 {
    1
}

fn default_period() -> u64 {
    10
}

fn default_failures() -> u32 {
    2
}

/// A software, as its descriptor file says.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Descriptor {
    /// Software name (what `request SOFTWARE` names).
    pub name: String,
    /// Version of this descriptor (default 1). Bump it when what runs
    /// changes: an agent runs an instance only when its own catalogue has
    /// the version the master assigns.
    #[serde(default = "default_version")]
    pub version: u32,
    /// One line for people.
    pub description: Option<String>,
    /// Program and arguments (placeholders allowed).
    pub command: Vec<String>,
    /// Run once in a new instance directory before the first start (e.g.
    /// initialise a database); it must exit 0.
    #[serde(default)]
    pub prepare: Vec<String>,
    /// Environment of the process (placeholders allowed).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Declared parameters.
    #[serde(default)]
    pub parameters: BTreeMap<String, Param>,
    /// Health checks.
    #[serde(default)]
    pub promises: Vec<Promise>,
    /// Connection parameters published for the requester.
    #[serde(default)]
    pub connection: BTreeMap<String, String>,
    /// What the instance's partition may use (CPU, memory, processes).
    #[serde(default)]
    pub limits: crate::cgroup::Limits,
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The placeholders `{NAME}` in a template (`{{` and `}}` are literal braces).
fn placeholders(t: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut chars = t.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
            }
            '{' => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(c) => name.push(c),
                        None => return Err(format!("unclosed '{{' in {t:?}")),
                    }
                }
                if !valid_name(&name) {
                    return Err(format!("bad placeholder {{{name}}} in {t:?}"));
                }
                out.push(name);
            }
            '}' => return Err(format!("lone '}}' in {t:?}")),
            _ => {}
        }
    }
    Ok(out)
}

/// Fills the placeholders of `t` from `values` (all must be there: the
/// descriptor was checked).
pub fn render(t: &str, values: &BTreeMap<String, String>) -> Result<String, DescriptorError> {
    let mut out = String::new();
    let mut chars = t.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                out.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                out.push('}');
            }
            '{' => {
                let name: String = chars.by_ref().take_while(|c| *c != '}').collect();
                let v = values
                    .get(&name)
                    .ok_or_else(|| DescriptorError::Invalid(format!("no value for {{{name}}}")))?;
                out.push_str(v);
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Checks a value against a type; returns its canonical text.
fn check_value(kind: ParamType, v: &str) -> Result<String, String> {
    match kind {
        ParamType::String if v.contains(['\n', '\r', '\0']) => {
            Err("must be one line of text".into())
        }
        ParamType::String => Ok(v.to_string()),
        ParamType::Integer => v
            .trim()
            .parse::<i64>()
            .map(|n| n.to_string())
            .map_err(|_| format!("{v:?} is not a whole number")),
        ParamType::Port => match v.trim().parse::<u16>() {
            Ok(p) if p > 0 => Ok(p.to_string()),
            _ => Err(format!("{v:?} is not a port (1-65535)")),
        },
        ParamType::Bool => match v.trim() {
            "true" | "yes" | "1" => Ok("true".into()),
            "false" | "no" | "0" => Ok("false".into()),
            _ => Err(format!("{v:?} is not true or false")),
        },
        ParamType::Path => crate::static_files::relative_path(v)
            .map(|p| match p.to_string_lossy() {
                t if t.is_empty() => ".".to_string(),
                t => t.into_owned(),
            })
            .ok_or_else(|| format!("{v:?} is not a relative path inside the instance directory")),
    }
}

fn toml_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Descriptor {
    /// Parses and checks a descriptor.
    pub fn parse(text: &str) -> Result<Self, DescriptorError> {
        let d: Descriptor =
            toml::from_str(text).map_err(|e| DescriptorError::Syntax(e.message().to_string()))?;
        d.check()?;
        Ok(d)
    }

    fn check(&self) -> Result<(), DescriptorError> {
        let bad = |m: String| Err(DescriptorError::Invalid(m));
        if !valid_name(&self.name) {
            return bad(format!(
                "name {:?}: letters, digits, - and _ only",
                self.name
            ));
        }
        if self.version == 0 {
            return bad("version: must be 1 or more".into());
        }
        self.limits.check().map_err(DescriptorError::Invalid)?;
        if self.command.is_empty() || self.command[0].trim().is_empty() {
            return bad("command: must name a program".into());
        }
        for (name, p) in &self.parameters {
            if !valid_name(name) || BUILTINS.contains(&name.as_str()) {
                return bad(format!("parameter name {name:?} is not allowed"));
            }
            if let Some(d) = &p.default {
                let ok = matches!(
                    (p.kind, d),
                    (ParamType::String | ParamType::Path, toml::Value::String(_))
                        | (ParamType::Integer, toml::Value::Integer(_))
                        | (ParamType::Port, toml::Value::Integer(_))
                        | (ParamType::Bool, toml::Value::Boolean(_))
                );
                if !ok {
                    return bad(format!(
                        "parameter {name}: default {d} is not a {:?}",
                        p.kind
                    ));
                }
                if let Err(e) = check_value(p.kind, &toml_text(d)) {
                    return bad(format!("parameter {name}: default {e}"));
                }
            }
        }
        for (i, p) in self.promises.iter().enumerate() {
            if p.http.is_some() == p.command.is_some() {
                return bad(format!("promise {i}: give either http or command"));
            }
            if p.period_s == 0 || p.failures == 0 {
                return bad(format!(
                    "promise {i}: period_s and failures must be positive"
                ));
            }
        }
        let templates = self
            .command
            .iter()
            .chain(self.prepare.iter())
            .chain(self.env.values())
            .chain(self.connection.values())
            .chain(self.promises.iter().filter_map(|p| p.http.as_ref()))
            .chain(
                self.promises
                    .iter()
                    .filter_map(|p| p.command.as_ref())
                    .flatten(),
            );
        for t in templates {
            for name in placeholders(t).map_err(DescriptorError::Invalid)? {
                if !BUILTINS.contains(&name.as_str()) && !self.parameters.contains_key(&name) {
                    return bad(format!("{{{name}}} is neither a parameter nor a built-in"));
                }
            }
        }
        Ok(())
    }

    /// The parameters of an instance: the request's values (checked and
    /// made canonical) over the defaults. Unknown names, wrong types and
    /// missing values without default are errors.
    pub fn resolve(
        &self,
        given: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, DescriptorError> {
        for name in given.keys() {
            if !self.parameters.contains_key(name) {
                let known: Vec<&str> = self.parameters.keys().map(String::as_str).collect();
                return Err(DescriptorError::Parameter {
                    name: name.clone(),
                    reason: format!("unknown; {} takes: {}", self.name, known.join(", ")),
                });
            }
        }
        let mut out = BTreeMap::new();
        for (name, p) in &self.parameters {
            let v = match (given.get(name), &p.default) {
                (Some(v), _) => v.clone(),
                (None, Some(d)) => toml_text(d),
                (None, None) => {
                    return Err(DescriptorError::Parameter {
                        name: name.clone(),
                        reason: "required".into(),
                    })
                }
            };
            let v = check_value(p.kind, &v).map_err(|reason| DescriptorError::Parameter {
                name: name.clone(),
                reason,
            })?;
            out.insert(name.clone(), v);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HTTP: &str = r#"
name = "http-static"
description = "A static HTTP file server"
command = ["python3", "-m", "http.server", "--bind", "{address}", "{port}"]
[parameters.port]
type = "port"
default = 8080
[parameters.title]
type = "string"
[[promises]]
http = "http://[{address}]:{port}/"
period_s = 5
[connection]
url = "http://[{address}]:{port}/"
"#;

    fn map(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_descriptor_parses_and_renders() {
        let d = Descriptor::parse(HTTP);
        let Ok(d) = d else {
            panic!("{d:?}");
        };
        let mut v = d.resolve(&map(&[("title", "hello")])).unwrap_or_default();
        assert_eq!(v.get("port").map(String::as_str), Some("8080"));
        v.insert("address".into(), "fd5e::1".into());
        assert_eq!(
            render(&d.connection["url"], &v),
            Ok("http://[fd5e::1]:8080/".to_string())
        );
        assert_eq!(render("{{x}} {port}", &v), Ok("{x} 8080".to_string()));
    }

    #[test]
    fn bad_descriptors_are_refused_with_the_reason() {
        let cases = [
            ("name = \"x\"\ncommand = [\"a\"]\nbogus = 1\n", "bogus"),
            ("name = \"a b\"\ncommand = [\"a\"]\n", "name"),
            ("name = \"x\"\ncommand = []\n", "command"),
            ("name = \"x\"\nversion = 0\ncommand = [\"a\"]\n", "version"),
            ("name = \"x\"\nversion = -1\ncommand = [\"a\"]\n", "integer `-1`"),
            ("name = \"x\"\ncommand = [\"a\"]\n[limits]\npids = 0\n", "limits.pids"),
            ("name = \"x\"\ncommand = [\"a\"]\n[limits]\nswap = 1\n", "swap"),
            ("name = \"x\"\ncommand = [\"a\", \"{nope}\"]\n", "{nope}"),
            ("name = \"x\"\ncommand = [\"a\", \"{oops\"]\n", "unclosed"),
            (
                "name = \"x\"\ncommand = [\"a\"]\n[parameters.p]\ntype = \"port\"\ndefault = \"80\"\n",
                "default",
            ),
            (
                "name = \"x\"\ncommand = [\"a\"]\n[parameters.p]\ntype = \"port\"\ndefault = 70000\n",
                "port",
            ),
            (
                "name = \"x\"\ncommand = [\"a\"]\n[parameters.p]\ntype = \"float\"\n",
                "float",
            ),
            ("name = \"x\"\ncommand = [\"a\"]\n[[promises]]\nperiod_s = 3\n", "either"),
            (
                "name = \"x\"\ncommand = [\"a\"]\n[parameters.address]\ntype = \"string\"\n",
                "not allowed",
            ),
        ];
        for (text, want) in cases {
            let e = Descriptor::parse(text).map(|_| ()).unwrap_err_or_default();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn request_parameters_are_checked() {
        let d = Descriptor::parse(HTTP).unwrap_or_else(|e| panic!("{e}"));
        let err = |kv: &[(&str, &str)]| d.resolve(&map(kv)).map(|_| ()).unwrap_err_or_default();
        assert!(err(&[("title", "t"), ("port", "x")]).contains("not a port"));
        assert!(err(&[("title", "t"), ("colour", "red")]).contains("unknown"));
        assert!(err(&[]).contains("title: required"));
        assert!(err(&[("title", "a\nb")]).contains("one line"));
        assert_eq!(
            d.resolve(&map(&[("title", "t"), ("port", " 81 ")]))
                .map(|v| v["port"].clone()),
            Ok("81".to_string())
        );
    }

    #[test]
    fn path_parameters_stay_in_the_instance_directory() {
        let d = Descriptor::parse(
            "name = \"s\"\ncommand = [\"serve\", \"{root}\"]\n[parameters.root]\ntype = \"path\"\ndefault = \".\"\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let root = |v: &str| d.resolve(&map(&[("root", v)])).map(|r| r["root"].clone());
        assert_eq!(
            d.resolve(&map(&[])).map(|r| r["root"].clone()),
            Ok(".".into())
        );
        assert_eq!(root("./www/"), Ok("www".into()));
        for bad in ["/", "/etc/re6stnet", "../x", "a/../../b", ".ssh"] {
            assert!(
                matches!(root(bad), Err(ref e) if e.to_string().contains("not a relative path")),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_shipped_catalogue_is_valid() {
        for text in [
            include_str!("../catalog/http-static.toml"),
            include_str!("../catalog/kv.toml"),
            include_str!("../catalog/re6st-registry.toml"),
        ] {
            assert!(
                Descriptor::parse(text).is_ok(),
                "{:?}",
                Descriptor::parse(text)
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in ".{0,400}", t in ".{0,80}") {
            let _ = Descriptor::parse(&text);
            let _ = placeholders(&t);
            let _ = render(&t, &BTreeMap::new());
        }
    }

    trait ErrText {
        fn unwrap_err_or_default(self) -> String;
    }
    impl ErrText for Result<(), DescriptorError> {
        fn unwrap_err_or_default(self) -> String {
            match self {
                Ok(()) => "accepted".into(),
                Err(e) => e.to_string(),
            }
        }
    }
}
