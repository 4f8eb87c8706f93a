//! Name patterns matched on whole dot-separated components, never on substrings.
//!
//! `model.layers.{layer}.mlp.up_proj.weight` has literal components and a variable `{layer}`
//! that binds exactly one component; `{path*}` binds one or more components. Because a literal
//! must equal a whole component, `up_proj` never matches inside `gate_up_proj`, and filling a
//! template from bindings can never produce a name like `gate_gate_up_proj`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Component {
    Literal(String),
    /// `{name}`: exactly one component.
    One(String),
    /// `{name*}`: one or more components.
    Many(String),
}

/// A compiled name pattern; also a template for building names from bindings.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Pattern {
    text: String,
    components: Vec<Component>,
    /// Whether some component is `{name*}` (otherwise every component has a fixed position).
    has_many: bool,
}

/// Variable values captured by a match, in the order the variables appear in the pattern.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bindings(Vec<(String, String)>);

impl Bindings {
    pub fn get(&self, var: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == var).map(|(_, v)| v.as_str())
    }

    /// The same bindings without `var` (used to group the experts of one stacked tensor).
    pub fn without(&self, var: &str) -> Bindings {
        Bindings(self.0.iter().filter(|(k, _)| k != var).cloned().collect())
    }

    pub fn with(mut self, var: &str, value: impl Into<String>) -> Bindings {
        self.0.retain(|(k, _)| k != var);
        self.0.push((var.to_string(), value.into()));
        self
    }

    fn bind(&mut self, var: &str, value: String) -> bool {
        match self.get(var) {
            Some(existing) => existing == value,
            None => {
                self.0.push((var.to_string(), value));
                true
            }
        }
    }
}

/// A pattern that does not parse; names the pattern and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad name pattern `{pattern}`: {reason}")]
pub struct PatternError {
    pub pattern: String,
    pub reason: String,
}

impl Pattern {
    pub fn parse(text: &str) -> Result<Pattern, PatternError> {
        let err = |reason: String| PatternError { pattern: text.to_string(), reason };
        let mut components = Vec::new();
        for part in text.split('.') {
            let component = if let Some(inner) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                let (name, many) = match inner.strip_suffix('*') {
                    Some(name) => (name, true),
                    None => (inner, false),
                };
                let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid {
                    return Err(err(format!("`{part}` is not a variable like {{name}} or {{name*}}")));
                }
                if many {
                    Component::Many(name.to_string())
                } else {
                    Component::One(name.to_string())
                }
            } else if part.is_empty() {
                return Err(err("empty component".into()));
            } else if part.contains(['{', '}', '*']) {
                return Err(err(format!("`{part}`: braces and `*` must span a whole component")));
            } else {
                Component::Literal(part.to_string())
            };
            components.push(component);
        }
        let has_many = components.iter().any(|c| matches!(c, Component::Many(_)));
        Ok(Pattern { text: text.to_string(), components, has_many })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Names of the variables, in order of first appearance.
    pub fn variables(&self) -> Vec<&str> {
        let mut vars: Vec<&str> = Vec::new();
        for c in &self.components {
            if let Component::One(v) | Component::Many(v) = c {
                if !vars.contains(&v.as_str()) {
                    vars.push(v);
                }
            }
        }
        vars
    }

    /// Matches a whole name; returns the bindings of its variables.
    pub fn matches(&self, name: &str) -> Option<Bindings> {
        let parts: Vec<&str> = name.split('.').collect();
        self.matches_components(&parts)
    }

    /// Matches a name already split at its dots (planners split each name once and try it
    /// against every rule, so this path allocates only on success).
    pub fn matches_components(&self, parts: &[&str]) -> Option<Bindings> {
        if !self.has_many {
            // Fixed positions: reject on length or any literal before binding anything.
            if parts.len() != self.components.len() {
                return None;
            }
            let literals_agree =
                self.components.iter().zip(parts).all(|(c, p)| !matches!(c, Component::Literal(l) if l != p));
            if !literals_agree {
                return None;
            }
        }
        let mut bindings = Bindings::default();
        match_from(&self.components, parts, &mut bindings).then_some(bindings)
    }

    /// Builds a name from bindings. Fails naming the variable that is unbound.
    pub fn fill(&self, bindings: &Bindings) -> Result<String, PatternError> {
        let mut out = Vec::with_capacity(self.components.len());
        for c in &self.components {
            match c {
                Component::Literal(l) => out.push(l.as_str()),
                Component::One(v) | Component::Many(v) => out.push(bindings.get(v).ok_or_else(|| PatternError {
                    pattern: self.text.clone(),
                    reason: format!("variable `{v}` is not bound"),
                })?),
            }
        }
        Ok(out.join("."))
    }
}

fn match_from(pattern: &[Component], name: &[&str], bindings: &mut Bindings) -> bool {
    let Some((first, rest)) = pattern.split_first() else {
        return name.is_empty();
    };
    match first {
        Component::Literal(l) => name.first() == Some(&l.as_str()) && match_from(rest, &name[1..], bindings),
        Component::One(var) => {
            let Some(value) = name.first() else { return false };
            try_bind(bindings, var, value.to_string(), |b| match_from(rest, &name[1..], b))
        }
        Component::Many(var) => {
            // Leave at least one name component for each remaining pattern component.
            let max_take = name.len().saturating_sub(rest.len());
            (1..=max_take)
                .any(|take| try_bind(bindings, var, name[..take].join("."), |b| match_from(rest, &name[take..], b)))
        }
    }
}

/// Binds `var` (or checks an existing binding), then tries `rest`; on failure leaves the
/// bindings exactly as they were.
fn try_bind(bindings: &mut Bindings, var: &str, value: String, rest: impl FnOnce(&mut Bindings) -> bool) -> bool {
    let before = bindings.0.len();
    if bindings.bind(var, value) && rest(bindings) {
        return true;
    }
    bindings.0.truncate(before);
    false
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for Pattern {
    type Err = PatternError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Pattern::parse(s)
    }
}

impl Serialize for Pattern {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Pattern::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> Pattern {
        Pattern::parse(s).unwrap()
    }

    #[test]
    fn literals_match_whole_components_only() {
        let up = p("model.layers.{layer}.mlp.up_proj.weight");
        assert!(up.matches("model.layers.3.mlp.gate_up_proj.weight").is_none());
        assert!(up.matches("model.layers.3.mlp.up_proj.weight_scale").is_none());
        assert!(up.matches("model.layers.3.mlp.up_proj.weight.extra").is_none());
        let b = up.matches("model.layers.3.mlp.up_proj.weight").unwrap();
        assert_eq!(b.get("layer"), Some("3"));
    }

    #[test]
    fn fill_cannot_duplicate_a_fused_prefix() {
        let up = p("model.layers.{layer}.mlp.up_proj.weight");
        let fused = p("model.layers.{layer}.mlp.gate_up_proj.weight");
        let b = up.matches("model.layers.7.mlp.up_proj.weight").unwrap();
        assert_eq!(fused.fill(&b).unwrap(), "model.layers.7.mlp.gate_up_proj.weight");
        // The name that substring replacement produces is not matched by either pattern.
        assert!(up.matches("model.layers.7.mlp.gate_gate_up_proj.weight").is_none());
        assert!(fused.matches("model.layers.7.mlp.gate_gate_up_proj.weight").is_none());
    }

    #[test]
    fn many_binds_one_or_more_components() {
        let any = p("{prefix*}.weight");
        assert_eq!(any.matches("a.b.c.weight").unwrap().get("prefix"), Some("a.b.c"));
        assert!(any.matches("weight").is_none());
        let mid = p("{a*}.x.{b*}");
        assert_eq!(mid.matches("1.x.2.x.3").unwrap().get("a"), Some("1"));
        assert_eq!(p("{all*}").fill(&p("{all*}").matches("q.k.v").unwrap()).unwrap(), "q.k.v");
    }

    #[test]
    fn repeated_variables_must_agree() {
        let same = p("{x}.{x}");
        assert!(same.matches("a.a").is_some());
        assert!(same.matches("a.b").is_none());
    }

    #[test]
    fn malformed_patterns_are_errors() {
        for bad in ["", "a..b", "a.{1x}", "a.{}", "up_{proj}", "a.*", "a.{b"] {
            let err = Pattern::parse(bad).unwrap_err();
            assert_eq!(err.pattern, bad);
        }
        let err = p("a.{missing}").fill(&Bindings::default()).unwrap_err();
        assert!(err.to_string().contains("missing"));
    }

    #[test]
    fn serde_uses_the_text() {
        let pat = p("model.{x}.w");
        assert_eq!(serde_json::to_string(&pat).unwrap(), "\"model.{x}.w\"");
        assert_eq!(serde_json::from_str::<Pattern>("\"model.{x}.w\"").unwrap(), pat);
        assert!(serde_json::from_str::<Pattern>("\"a..b\"").is_err());
    }

    proptest! {
        /// A pattern made from a name by replacing some components with variables matches that
        /// name, and filling it from the match rebuilds the name exactly.
        #[test]
        fn match_then_fill_round_trips(
            parts in prop::collection::vec("[a-z_]{1,6}|[0-9]{1,3}", 1..8),
            vars in prop::collection::vec(any::<bool>(), 8),
        ) {
            let name = parts.join(".");
            let text: Vec<String> = parts.iter().enumerate()
                .map(|(i, c)| if vars[i] { format!("{{v{i}}}") } else { c.clone() })
                .collect();
            let pattern = p(&text.join("."));
            let bindings = pattern.matches(&name).expect("pattern built from the name matches it");
            prop_assert_eq!(pattern.fill(&bindings).unwrap(), name);
        }

        /// A literal component never matches a name component that merely contains it.
        #[test]
        fn literal_never_matches_a_longer_component(lit in "[a-z]{1,6}", pre in "[a-z_]{0,4}", post in "[a-z_]{0,4}") {
            prop_assume!(!pre.is_empty() || !post.is_empty());
            let pattern = p(&format!("a.{lit}.b"));
            let name = format!("a.{pre}{lit}{post}.b");
            prop_assert!(pattern.matches(&name).is_none());
        }
    }
}
