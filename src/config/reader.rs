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

    /// A human duration such as `"15m"`, `"30d"` or `"100ms"`, at least `min`.
    pub fn duration_or(&mut self, key: &str, default: &str, min: Duration) -> Duration {
        let text = self.string_or(key, default);
        match humantime::parse_duration(&text) {
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
