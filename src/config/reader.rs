//! A reader over a parsed TOML table that collects every problem instead of
//! stopping at the first.
//!
//! serde's `deny_unknown_fields` stops at the first unknown key or bad type;
//! an operator fixing a config file wants the whole list in one go. Each
//! accessor takes a key out of the table, converts it, and on failure records
//! an error naming the full dotted field (`auth.access_token_ttl`). What is
//! left in the table when [`Fields::finish`] runs is reported as unknown.

use std::net::SocketAddr;
use std::time::Duration;

use toml::{Table, Value};

/// No configured duration may be longer (100 years): added to a clock
/// reading, a longer one could overflow it, and none means anything.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Accumulates `field: problem` messages.
#[derive(Debug, Default)]
pub struct Errors(pub Vec<String>);

impl Errors {
    pub fn push(&mut self, field: &str, msg: impl std::fmt::Display) {
        self.0.push(format!("{field}: {msg}"));
    }
}

/// The keys of one TOML table, consumed one accessor at a time.
pub struct Fields<'e> {
    prefix: String,
    table: Table,
    errors: &'e mut Errors,
}

impl<'e> Fields<'e> {
    pub fn new(prefix: &str, table: Table, errors: &'e mut Errors) -> Self {
        Self { prefix: prefix.to_owned(), table, errors }
    }

    fn name(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    /// Records an error against `key` of this table.
    pub fn error(&mut self, key: &str, msg: impl std::fmt::Display) {
        let name = self.name(key);
        self.errors.push(&name, msg);
    }

    /// Whether `key` is present (and not yet taken).
    pub fn has(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    fn take(&mut self, key: &str) -> Option<Value> {
        self.table.remove(key)
    }

    /// A sub-table; absent means empty.
    pub fn table(&mut self, key: &str) -> Table {
        match self.take(key) {
            None => Table::new(),
            Some(Value::Table(t)) => t,
            Some(other) => {
                self.error(key, format!("expected a table, found {}", other.type_str()));
                Table::new()
            }
        }
    }

    /// A sub-table read field by field, its errors named under this one's
    /// (`routes[0].rate_limit.per`); `None` when absent (or not a table,
    /// which is an error).
    pub fn sub(&mut self, key: &str) -> Option<Fields<'_>> {
        let table = match self.take(key)? {
            Value::Table(t) => t,
            other => {
                self.error(key, format!("expected a table, found {}", other.type_str()));
                return None;
            }
        };
        let prefix = self.name(key);
        Some(Fields { prefix, table, errors: &mut *self.errors })
    }

    /// An array of tables (`[[routes]]`); absent means empty.
    pub fn array_of_tables(&mut self, key: &str) -> Vec<Table> {
        match self.take(key) {
            None => Vec::new(),
            Some(Value::Array(items)) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.into_iter().enumerate() {
                    match item {
                        Value::Table(t) => out.push(t),
                        other => {
                            self.error(&format!("{key}[{i}]"), format!("expected a table, found {}", other.type_str()));
                        }
                    }
                }
                out
            }
            Some(other) => {
                self.error(key, format!("expected an array of tables, found {}", other.type_str()));
                Vec::new()
            }
        }
    }

    /// A list of strings; absent means empty.
    pub fn string_list(&mut self, key: &str) -> Vec<String> {
        match self.take(key) {
            None => Vec::new(),
            Some(Value::Array(items)) => {
                let mut out = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        Value::String(s) => out.push(s),
                        other => self.error(key, format!("expected strings, found {}", other.type_str())),
                    }
                }
                out
            }
            Some(other) => {
                self.error(key, format!("expected an array of strings, found {}", other.type_str()));
                Vec::new()
            }
        }
    }

    /// A size in bytes: an integer, or a string like `"10MiB"`, `"512KiB"`, `"1MB"`.
    pub fn size_or(&mut self, key: &str, default: u64) -> u64 {
        match self.take(key) {
            None => default,
            Some(Value::Integer(n)) if n >= 0 => n as u64,
            Some(Value::String(s)) => match parse_size(&s) {
                Some(n) => n,
                None => {
                    self.error(key, format!("{s:?} is not a size like \"10MiB\" or 1048576"));
                    default
                }
            },
            Some(other) => {
                self.error(key, format!("expected a size, found {}", other.type_str()));
                default
            }
        }
    }

    pub fn string(&mut self, key: &str) -> Option<String> {
        match self.take(key)? {
            Value::String(s) => Some(s),
            other => {
                self.error(key, format!("expected a string, found {}", other.type_str()));
                None
            }
        }
    }

    pub fn string_or(&mut self, key: &str, default: &str) -> String {
        self.string(key).unwrap_or_else(|| default.to_owned())
    }

    pub fn bool_or(&mut self, key: &str, default: bool) -> bool {
        match self.take(key) {
            None => default,
            Some(Value::Boolean(b)) => b,
            Some(other) => {
                self.error(key, format!("expected true or false, found {}", other.type_str()));
                default
            }
        }
    }

    /// An integer within `min..=max`.
    pub fn int_or(&mut self, key: &str, default: i64, min: i64, max: i64) -> i64 {
        match self.take(key) {
            None => default,
            Some(Value::Integer(n)) if (min..=max).contains(&n) => n,
            Some(Value::Integer(n)) => {
                self.error(key, format!("{n} is out of range ({min} to {max})"));
                default
            }
            Some(other) => {
                self.error(key, format!("expected an integer, found {}", other.type_str()));
                default
            }
        }
    }

    /// A human duration such as `"15m"`, `"30d"` or `"100ms"`, at least `min`
    /// and at most [`MAX_DURATION`].
    pub fn duration_or(&mut self, key: &str, default: &str, min: Duration) -> Duration {
        let text = self.string_or(key, default);
        match humantime::parse_duration(&text) {
            Ok(d) if d > MAX_DURATION => {
                self.error(
                    key,
                    format!("{text:?} is longer than the maximum {}", humantime::format_duration(MAX_DURATION)),
                );
                humantime::parse_duration(default).unwrap_or(min)
            }
            Ok(d) if d >= min => d,
            Ok(_) => {
                self.error(key, format!("{text:?} is shorter than the minimum {}", humantime::format_duration(min)));
                humantime::parse_duration(default).unwrap_or(min)
            }
            Err(e) => {
                self.error(key, format!("{text:?} is not a duration like \"15m\" or \"30d\" ({e})"));
                humantime::parse_duration(default).unwrap_or(min)
            }
        }
    }

    pub fn socket_addr_or(&mut self, key: &str, default: &str) -> Option<SocketAddr> {
        let text = self.string_or(key, default);
        match text.parse() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.error(key, format!("{text:?} is not an address like \"127.0.0.1:8080\""));
                None
            }
        }
    }

    /// Reports every key nobody asked for.
    pub fn finish(self) {
        let Fields { prefix, table, errors } = self;
        for key in table.keys() {
            let name = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
            errors.push(&name, "unknown key");
        }
    }
}

fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "kib" | "k" => 1 << 10,
        "mb" => 1_000_000,
        "mib" | "m" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" | "g" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}
