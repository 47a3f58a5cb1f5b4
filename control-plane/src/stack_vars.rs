//! Per-environment substitution in an edge stack's compose file, so one stack serves a fleet
//! of differently configured devices.
//!
//! What `${NAME}` stands for, first found wins:
//! - `EDGE_ENV_NAME`, `EDGE_ENV_ID`, `EDGE_GROUP_NAME` (empty without a group), `EDGE_TAGS`
//!   (the environment's tag names and its group's, comma-separated);
//! - the environment's own variables;
//! - `EDGE_TAG_<key>` for each tag named `key=value` (`site=berlin` gives
//!   `EDGE_TAG_site` = `berlin`), the environment's own before its group's;
//! - the stack's variables.
//!
//! Compose's forms: `$NAME`, `${NAME}`, `${NAME:-default}` (unset or empty), `${NAME-default}`
//! (unset), `${NAME:?message}` and `${NAME?message}` (an error), `$$` for a `$`. Unlike
//! compose, a plain `${NAME}` that is not set is an error, not an empty string: on a fleet a
//! device missing a value should fail visibly, with the name, not start misconfigured.

use std::collections::BTreeMap;

/// What an environment's compose file is rendered with.
#[derive(Debug, Default, Clone)]
pub struct Vars {
    values: BTreeMap<String, String>,
}

impl Vars {
    /// The variables of environment `id` named `name`, in group `group` (its name), with
    /// `tags` (names, its own then its group's) and its own `variables`, for a stack with
    /// `stack` variables.
    pub fn new(
        id: u64,
        name: &str,
        group: Option<&str>,
        tags: &[String],
        variables: &BTreeMap<String, String>,
        stack: &BTreeMap<String, String>,
    ) -> Self {
        let mut values = stack.clone();
        for t in tags.iter().rev() {
            if let Some((k, v)) = t.split_once('=') {
                let k = k.trim();
                // (Values are substituted into YAML as text: none with a line break.)
                if !k.is_empty()
                    && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                    && !v.chars().any(char::is_control)
                {
                    values.insert(format!("EDGE_TAG_{k}"), v.trim().to_owned());
                }
            }
        }
        values.extend(variables.iter().map(|(k, v)| (k.clone(), v.clone())));
        values.insert("EDGE_ENV_NAME".into(), name.to_owned());
        values.insert("EDGE_ENV_ID".into(), id.to_string());
        values.insert(
            "EDGE_GROUP_NAME".into(),
            group.unwrap_or_default().to_owned(),
        );
        values.insert("EDGE_TAGS".into(), tags.join(","));
        Self { values }
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// `file` with every variable replaced; an error names the first one that cannot be.
    pub fn render(&self, file: &str) -> Result<String, String> {
        let mut out = String::with_capacity(file.len());
        let mut rest = file;
        while let Some(at) = rest.find('$') {
            out.push_str(&rest[..at]);
            let after = &rest[at + 1..];
            if let Some(tail) = after.strip_prefix('$') {
                out.push('$');
                rest = tail;
            } else if let Some(body) = after.strip_prefix('{') {
                let end = body
                    .find('}')
                    .ok_or_else(|| format!("unclosed ${{ in {:?}", cut(&rest[at..])))?;
                out.push_str(&self.expand(&body[..end])?);
                rest = &body[end + 1..];
            } else {
                let len = after
                    .bytes()
                    .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
                    .count();
                if len == 0 || after.as_bytes()[0].is_ascii_digit() {
                    // A lone `$` (in a shell command, say) stays as it is.
                    out.push('$');
                    rest = after;
                } else {
                    out.push_str(&self.expand(&after[..len])?);
                    rest = &after[len..];
                }
            }
        }
        out.push_str(rest);
        Ok(out)
    }

    /// The value of one `${...}` body.
    fn expand(&self, body: &str) -> Result<String, String> {
        let name_len = body
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
            .count();
        let (name, op) = body.split_at(name_len);
        if name.is_empty() {
            return Err(format!("${{{body}}} names no variable"));
        }
        let value = self.get(name);
        let (kind, arg) = if let Some(a) = op.strip_prefix(":-") {
            (":-", a)
        } else if let Some(a) = op.strip_prefix(":?") {
            (":?", a)
        } else if let Some(a) = op.strip_prefix('-') {
            ("-", a)
        } else if let Some(a) = op.strip_prefix('?') {
            ("?", a)
        } else if op.is_empty() {
            ("", "")
        } else {
            return Err(format!("${{{body}}}: {op:?} is not a form compose knows"));
        };
        let unset_or_empty = value.is_none_or(str::is_empty);
        match (kind, value) {
            (":-", _) if unset_or_empty => Ok(arg.to_owned()),
            ("-", None) => Ok(arg.to_owned()),
            (":?", _) if unset_or_empty => Err(format!("{name}: {arg}")),
            ("?", None) => Err(format!("{name}: {arg}")),
            (_, Some(v)) => Ok(v.to_owned()),
            (_, None) => Err(format!(
                "variable {name} is not set for this environment (set it on the stack, or write ${{{name}:-default}})"
            )),
        }
    }
}

/// The start of `s`, for an error message.
fn cut(s: &str) -> &str {
    let end = s.char_indices().nth(40).map_or(s.len(), |(i, _)| i);
    &s[..end]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn vars() -> Vars {
        let stack = BTreeMap::from([
            ("TAG".to_owned(), "1.4".to_owned()),
            ("EMPTY".to_owned(), String::new()),
            ("EDGE_ENV_NAME".to_owned(), "not this".to_owned()),
        ]);
        let tags = vec![
            "kiosk".to_owned(),
            "site=berlin".to_owned(),
            "site=group-default".to_owned(),
            "floor = 3".to_owned(),
        ];
        let own = BTreeMap::from([("TAG".to_owned(), "1.5-pilot".to_owned())]);
        let mut v = Vars::new(42, "till-7", Some("shops"), &tags, &BTreeMap::new(), &stack);
        assert_eq!(v.render("${TAG}").unwrap(), "1.4");
        v = Vars::new(42, "till-7", Some("shops"), &tags, &own, &stack);
        assert_eq!(
            v.render("${TAG}").unwrap(),
            "1.5-pilot",
            "its own over the stack's"
        );
        Vars::new(42, "till-7", Some("shops"), &tags, &BTreeMap::new(), &stack)
    }

    #[test]
    fn one_file_becomes_each_environments_own() {
        let v = vars();
        let file = "image: app:${TAG}\nenvironment:\n  SITE: ${EDGE_TAG_site}\n  \
                    NAME: $EDGE_ENV_NAME-${EDGE_ENV_ID}\n  FLOOR: ${EDGE_TAG_floor}\n  \
                    G: ${EDGE_GROUP_NAME} T: ${EDGE_TAGS}\n  PRICE: $$5 $ 1 $1\n";
        assert_eq!(
            v.render(file).unwrap(),
            "image: app:1.4\nenvironment:\n  SITE: berlin\n  NAME: till-7-42\n  FLOOR: 3\n  \
             G: shops T: kiosk,site=berlin,site=group-default,floor = 3\n  PRICE: $5 $ 1 $1\n"
        );
        // The environment's own tag wins over its group's; built-ins over the stack's.
    }

    #[test]
    fn defaults_and_errors_follow_compose_but_an_unset_plain_variable_fails() {
        let v = vars();
        assert_eq!(
            v.render("${NOPE:-d} ${EMPTY:-d} ${EMPTY-d} ${NOPE-d}")
                .unwrap(),
            "d d  d"
        );
        assert_eq!(v.render("${TAG:?needed}").unwrap(), "1.4");
        let e = v.render("${NOPE:?the registry password}").unwrap_err();
        assert!(e.contains("NOPE: the registry password"), "{e}");
        let e = v.render("${EMPTY:?must not be empty}").unwrap_err();
        assert!(e.contains("EMPTY"), "{e}");
        let e = v.render("image: ${REGISTRY}/app").unwrap_err();
        assert!(e.contains("REGISTRY is not set"), "{e}");
        assert!(v.render("${TAG").unwrap_err().contains("unclosed"));
        assert!(v.render("${}").unwrap_err().contains("names no variable"));
        assert!(v.render("${TAG/x/y}").unwrap_err().contains("not a form"));
        // Multi-byte text around variables is kept.
        assert_eq!(v.render("été ${TAG} ü").unwrap(), "été 1.4 ü");
    }
}
