//! The one parser of `key=value,flag,...` command-line specs (`--export`,
//! `--port`).
//!
//! A [`Grammar`] names the keys a spec knows and what each takes; [`parse`]
//! splits the text at commas, checks every item against the grammar and
//! returns the values by key. What it refuses, each with a [`SpecError`]
//! naming the key: an empty item or key, a key the grammar does not know, a
//! key given twice, a value key without a value, a flag given a value other
//! than `on`/`true`/`off`/`false`. Whether a key is required, and what its
//! value must look like, is the caller's business ([`Parsed::required`]
//! reports a missing one).

/// What a key takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// `key=VALUE` with a non-empty value; `hint` stands for the value in
    /// messages (`PATH`).
    Value { hint: &'static str },
    /// `key=VALUE` where the value may be empty (`id=`).
    MaybeEmpty { hint: &'static str },
    /// `key` alone (on), or `key=on|true|off|false`.
    Flag,
}

/// One key of a grammar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key {
    /// The key as written before `=`.
    pub name: &'static str,
    /// What it takes.
    pub kind: KeyKind,
}

impl Key {
    /// A key that needs a non-empty value.
    pub const fn value(name: &'static str, hint: &'static str) -> Key {
        Key {
            name,
            kind: KeyKind::Value { hint },
        }
    }

    /// A key whose value may be empty.
    pub const fn maybe_empty(name: &'static str, hint: &'static str) -> Key {
        Key {
            name,
            kind: KeyKind::MaybeEmpty { hint },
        }
    }

    /// A flag.
    pub const fn flag(name: &'static str) -> Key {
        Key {
            name,
            kind: KeyKind::Flag,
        }
    }

    /// What stands for the value in messages (`PATH`); flags have none.
    fn hint(&self) -> &'static str {
        match self.kind {
            KeyKind::Value { hint } | KeyKind::MaybeEmpty { hint } => hint,
            KeyKind::Flag => "on|off",
        }
    }
}

/// The keys one kind of spec knows, and its usage line for messages.
#[derive(Debug, PartialEq, Eq)]
pub struct Grammar {
    /// Known keys, in the order the usage line gives them.
    pub keys: &'static [Key],
    /// The whole spec as documented (`socket=PATH,image=PATH[,readonly]`).
    pub usage: &'static str,
}

impl Grammar {
    fn key(&self, name: &str) -> Option<&'static Key> {
        self.keys.iter().find(|k| k.name == name)
    }

    /// The known keys, comma-separated.
    fn known(&self) -> String {
        let names: Vec<&str> = self.keys.iter().map(|k| k.name).collect();
        names.join(", ")
    }
}

/// Why a spec does not parse.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// An item with nothing before its `=` (`,,`, a trailing comma, `=x`).
    #[error("empty key in item `{item}`; expected key=value pairs `{}`", .grammar.usage)]
    EmptyKey {
        /// The item as written.
        item: String,
        /// The grammar it was checked against.
        grammar: &'static Grammar,
    },
    /// A key the grammar does not know.
    #[error("unknown key `{key}` (known: {})", .grammar.known())]
    UnknownKey {
        /// The key as written.
        key: String,
        /// The grammar it was checked against.
        grammar: &'static Grammar,
    },
    /// A key given twice.
    #[error("`{key}` given twice")]
    Duplicate {
        /// The key.
        key: &'static str,
    },
    /// A value key written alone or with an empty value.
    #[error("`{key}` needs a value (`{key}={hint}`); expected key=value pairs `{}`", .grammar.usage)]
    MissingValue {
        /// The key.
        key: &'static str,
        /// What stands for its value in the usage line.
        hint: &'static str,
        /// The grammar it was checked against.
        grammar: &'static Grammar,
    },
    /// A flag given a value it does not take.
    #[error("`{key}` is a flag: give it alone or as {key}=on|off, not `{key}={value}`")]
    FlagValue {
        /// The flag.
        key: &'static str,
        /// The value it was given.
        value: String,
    },
    /// `memory=` that is not a number of MiB above 0.
    #[error("`memory={value}` is not a size in MiB (a whole number above 0)")]
    Memory {
        /// The value as written.
        value: String,
    },
    /// `frontend-uid=` that is not a uid.
    #[error("`frontend-uid={value}` is not a uid (a whole number below 2^32)")]
    Uid {
        /// The value as written.
        value: String,
    },
    /// A key the caller requires is absent.
    #[error("missing `{key}={hint}`")]
    Missing {
        /// The key.
        key: &'static str,
        /// What stands for its value in the usage line.
        hint: &'static str,
    },
}

/// The value one key was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Given<'a> {
    Value(&'a str),
    Flag(bool),
}

/// A spec checked against its grammar: the value of every key given.
#[derive(Debug)]
pub struct Parsed<'a> {
    grammar: &'static Grammar,
    given: Vec<(&'static str, Given<'a>)>,
}

/// Splits `text` at commas and checks every item against `grammar`.
pub fn parse<'a>(text: &'a str, grammar: &'static Grammar) -> Result<Parsed<'a>, SpecError> {
    let mut given: Vec<(&'static str, Given<'a>)> = Vec::new();
    for item in text.split(',') {
        let (name, value) = match item.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (item, None),
        };
        if name.is_empty() {
            return Err(SpecError::EmptyKey {
                item: item.to_string(),
                grammar,
            });
        }
        let key = grammar.key(name).ok_or_else(|| SpecError::UnknownKey {
            key: name.to_string(),
            grammar,
        })?;
        let value = match (key.kind, value) {
            (KeyKind::Value { .. }, Some(v)) if !v.is_empty() => Given::Value(v),
            (KeyKind::MaybeEmpty { .. }, Some(v)) => Given::Value(v),
            (KeyKind::Value { .. } | KeyKind::MaybeEmpty { .. }, _) => {
                return Err(SpecError::MissingValue {
                    key: key.name,
                    hint: key.hint(),
                    grammar,
                })
            }
            (KeyKind::Flag, None | Some("on" | "true")) => Given::Flag(true),
            (KeyKind::Flag, Some("off" | "false")) => Given::Flag(false),
            (KeyKind::Flag, Some(v)) => {
                return Err(SpecError::FlagValue {
                    key: key.name,
                    value: v.to_string(),
                })
            }
        };
        if given.iter().any(|(k, _)| *k == key.name) {
            return Err(SpecError::Duplicate { key: key.name });
        }
        given.push((key.name, value));
    }
    Ok(Parsed { grammar, given })
}

impl<'a> Parsed<'a> {
    fn given(&self, key: &str) -> Option<Given<'a>> {
        self.given
            .iter()
            .find(|(k, _)| *k == key)
            .map(|&(_, given)| given)
    }

    /// The value of `key`, if it was given.
    pub fn value(&self, key: &str) -> Option<&'a str> {
        match self.given(key)? {
            Given::Value(v) => Some(v),
            Given::Flag(_) => None,
        }
    }

    /// The value of `key`; [`SpecError::Missing`] if it was not given.
    pub fn required(&self, key: &'static str) -> Result<&'a str, SpecError> {
        self.value(key).ok_or(SpecError::Missing {
            key,
            hint: self.grammar.key(key).map_or("VALUE", Key::hint),
        })
    }

    /// `memory=MIB`, the guest memory the partition was granted, in
    /// bytes: the most its frontend's memory table may map in total.
    pub fn memory_limit(&self) -> Result<Option<u64>, SpecError> {
        let Some(v) = self.value("memory") else {
            return Ok(None);
        };
        v.parse::<u64>()
            .ok()
            .filter(|m| *m > 0)
            .and_then(|m| m.checked_mul(1 << 20))
            .map(Some)
            .ok_or_else(|| SpecError::Memory {
                value: v.to_string(),
            })
    }

    /// `frontend-uid=UID`: the only uid whose frontend may connect (the
    /// partition's monitor, as partd started it).
    pub fn frontend_uid(&self) -> Result<Option<u32>, SpecError> {
        let Some(v) = self.value("frontend-uid") else {
            return Ok(None);
        };
        v.parse::<u32>().map(Some).map_err(|_| SpecError::Uid {
            value: v.to_string(),
        })
    }

    /// The state of flag `key`, if it was given.
    pub fn flag(&self, key: &str) -> Option<bool> {
        match self.given(key)? {
            Given::Flag(on) => Some(on),
            Given::Value(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static GRAMMAR: Grammar = Grammar {
        keys: &[
            Key::value("socket", "PATH"),
            Key::maybe_empty("id", "SERIAL"),
            Key::flag("readonly"),
        ],
        usage: "socket=PATH[,id=SERIAL][,readonly]",
    };

    fn err(text: &str) -> SpecError {
        parse(text, &GRAMMAR).unwrap_err()
    }

    #[test]
    fn values_and_flags_are_returned_by_key_in_any_order() {
        let p = parse("readonly,id=disk-a,socket=/run/a.sock", &GRAMMAR).unwrap();
        assert_eq!(p.value("socket"), Some("/run/a.sock"));
        assert_eq!(p.required("socket"), Ok("/run/a.sock"));
        assert_eq!(p.value("id"), Some("disk-a"));
        assert_eq!(p.flag("readonly"), Some(true));
        let p = parse("socket=s", &GRAMMAR).unwrap();
        assert_eq!(p.value("id"), None);
        assert_eq!(p.flag("readonly"), None);
    }

    #[test]
    fn a_value_may_contain_equals_signs() {
        let p = parse("socket=/run/a=b.sock", &GRAMMAR).unwrap();
        assert_eq!(p.value("socket"), Some("/run/a=b.sock"));
    }

    #[test]
    fn flags_take_on_true_off_and_false() {
        for (text, on) in [
            ("readonly=on", true),
            ("readonly=true", true),
            ("readonly=off", false),
            ("readonly=false", false),
        ] {
            assert_eq!(parse(text, &GRAMMAR).unwrap().flag("readonly"), Some(on));
        }
    }

    #[test]
    fn a_flag_given_another_value_is_refused_with_the_value() {
        let e = err("socket=s,readonly=yes");
        assert_eq!(
            e,
            SpecError::FlagValue {
                key: "readonly",
                value: "yes".into()
            }
        );
        assert_eq!(
            e.to_string(),
            "`readonly` is a flag: give it alone or as readonly=on|off, not `readonly=yes`"
        );
    }

    #[test]
    fn empty_keys_and_items_are_refused() {
        for (text, item) in [("socket=s,,id=a", ""), ("=x", "=x"), ("socket=s,", "")] {
            assert_eq!(
                err(text),
                SpecError::EmptyKey {
                    item: item.into(),
                    grammar: &GRAMMAR
                },
                "{text}"
            );
        }
        assert_eq!(
            err("=x").to_string(),
            "empty key in item `=x`; expected key=value pairs `socket=PATH[,id=SERIAL][,readonly]`"
        );
    }

    #[test]
    fn an_unknown_key_is_named_with_the_known_ones() {
        let e = err("socket=s,size=3");
        assert_eq!(
            e,
            SpecError::UnknownKey {
                key: "size".into(),
                grammar: &GRAMMAR
            }
        );
        assert_eq!(
            e.to_string(),
            "unknown key `size` (known: socket, id, readonly)"
        );
    }

    #[test]
    fn a_key_given_twice_is_refused_even_with_the_same_value() {
        assert_eq!(
            err("socket=a,socket=a"),
            SpecError::Duplicate { key: "socket" }
        );
        assert_eq!(
            err("readonly,readonly=off"),
            SpecError::Duplicate { key: "readonly" }
        );
        assert_eq!(err("id=,id=x").to_string(), "`id` given twice");
    }

    #[test]
    fn a_value_key_without_a_value_is_refused() {
        for text in ["socket", "socket=", "id"] {
            assert!(
                matches!(err(text), SpecError::MissingValue { .. }),
                "{text}"
            );
        }
        assert_eq!(
            err("socket=").to_string(),
            "`socket` needs a value (`socket=PATH`); expected key=value pairs `socket=PATH[,id=SERIAL][,readonly]`"
        );
    }

    #[test]
    fn an_empty_value_is_kept_where_the_key_allows_it() {
        assert_eq!(parse("id=", &GRAMMAR).unwrap().value("id"), Some(""));
    }

    #[test]
    fn a_required_key_that_is_absent_is_reported_with_its_form() {
        let p = parse("id=x", &GRAMMAR).unwrap();
        let e = p.required("socket").unwrap_err();
        assert_eq!(
            e,
            SpecError::Missing {
                key: "socket",
                hint: "PATH"
            }
        );
        assert_eq!(e.to_string(), "missing `socket=PATH`");
    }
}
