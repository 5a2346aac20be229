//! Reading typed fields out of JSON, with errors that name the field.

use serde_json::Value;

use super::error::EventError;

/// The longest key S3 and QingStor accept, in bytes.
pub(crate) const MAX_KEY_BYTES: usize = 1024;

/// A JSON object (or any value) with the path it was found at.
#[derive(Clone, Copy)]
pub(crate) struct At<'a> {
    pub value: &'a Value,
    pub path: &'a str,
}

impl<'a> At<'a> {
    pub fn new(value: &'a Value, path: &'a str) -> At<'a> {
        At { value, path }
    }

    pub fn field_path(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path)
        }
    }

    /// The field, `None` when absent or null.
    pub fn get(&self, name: &str) -> Option<&'a Value> {
        self.value.get(name).filter(|v| !v.is_null())
    }

    /// An object field that must be present.
    pub fn object(&self, name: &str) -> Result<&'a Value, EventError> {
        match self.get(name) {
            Some(v @ Value::Object(_)) => Ok(v),
            Some(other) => Err(self.wrong_type(name, "an object", other)),
            None => Err(self.missing(name)),
        }
    }

    /// A non-empty string field that must be present.
    pub fn string(&self, name: &str) -> Result<&'a str, EventError> {
        match self.get(name) {
            Some(Value::String(s)) if s.is_empty() => Err(EventError::Empty {
                field: self.field_path(name),
            }),
            Some(Value::String(s)) => Ok(s),
            Some(other) => Err(self.wrong_type(name, "a string", other)),
            None => Err(self.missing(name)),
        }
    }

    /// An optional string field; empty counts as absent.
    pub fn optional_string(&self, name: &str) -> Result<Option<&'a str>, EventError> {
        match self.get(name) {
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.wrong_type(name, "a string", other)),
            None => Ok(None),
        }
    }

    /// An optional size in bytes; a string of digits is accepted too, as
    /// some senders quote numbers.
    pub fn optional_size(&self, name: &str) -> Result<Option<u64>, EventError> {
        let expected = "a size in bytes (a non-negative integer)";
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.wrong_type(name, expected, &Value::Number(n.clone()))),
            Some(v @ Value::String(s)) => s
                .parse::<u64>()
                .map(Some)
                .map_err(|_| self.wrong_type(name, expected, v)),
            Some(other) => Err(self.wrong_type(name, expected, other)),
        }
    }

    fn missing(&self, name: &str) -> EventError {
        EventError::MissingField {
            field: self.field_path(name),
        }
    }

    fn wrong_type(&self, name: &str, expected: &'static str, found: &Value) -> EventError {
        EventError::WrongType {
            field: self.field_path(name),
            expected,
            found: describe(found),
        }
    }
}

/// Checks a decoded key: not longer than S3 allows.
pub(crate) fn check_key(key: &str, field: String) -> Result<(), EventError> {
    if key.len() > MAX_KEY_BYTES {
        return Err(EventError::InvalidKey {
            field,
            key: crate::shown(key),
            reason: "longer than 1024 bytes",
        });
    }
    Ok(())
}

/// The longest ETag taken: S3's are 32 hex digits, or 34-38 characters
/// for a multipart upload, and other stores' no longer than a digest. An
/// event carries its ETag into the journal and every result it fires, so
/// a longer one is refused, not kept.
pub(crate) const MAX_ETAG_BYTES: usize = 256;

/// An ETag without the quotes some senders keep around it; `field` names
/// it in the error for one longer than [`MAX_ETAG_BYTES`].
pub(crate) fn etag(
    raw: Option<&str>,
    field: impl FnOnce() -> String,
) -> Result<Option<String>, EventError> {
    let Some(tag) = raw.map(|e| e.trim_matches('"')).filter(|e| !e.is_empty()) else {
        return Ok(None);
    };
    if tag.len() > MAX_ETAG_BYTES {
        return Err(EventError::TooLong {
            field: field(),
            bytes: tag.len(),
            limit: MAX_ETAG_BYTES,
        });
    }
    Ok(Some(tag.to_string()))
}

/// A JSON value for messages: scalars as written (shortened), others by kind.
pub(crate) fn describe(value: &Value) -> String {
    match value {
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::String(s) if s.chars().count() > 40 => {
            format!("\"{}...\"", s.chars().take(40).collect::<String>())
        }
        Value::String(s) => format!("\"{s}\""),
        other => kind(other).to_string(),
    }
}

pub(crate) use crate::rules::json_kind as kind;
