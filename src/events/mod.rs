//! Incoming bucket events, whatever their format, as one [`Event`] type.
//!
//! Two formats are read, detected by their shape:
//!
//! - S3 event notifications, `{"Records": [...]}`, as MinIO, Ceph RGW,
//!   RustFS and AWS send them (also wrapped in an SNS `Notification`, which
//!   is how AWS delivers to an HTTP endpoint). See [`s3`] for the mapping of
//!   event names and the decoding of keys.
//! - QingStor-style events, one object or a list of them:
//!   `{"event_type": "create_object", "bucket_name": "photos",
//!   "object_key": "photos/a.jpg", "size": 123, "etag": "..."}`, where
//!   `size` and `etag` are optional and the key is plain text, not
//!   URL-encoded. See [`qingstor`].
//!
//! Records of kinds that no rule can subscribe to (reads, tagging, test
//! events) are not errors: they are returned in [`ParsedEvents::skipped`] so
//! the caller can count them.

mod error;
mod fields;
pub mod qingstor;
pub mod s3;

pub use error::EventError;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::rules::EventType;

/// Where an event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventSource {
    /// A record of an S3 event notification.
    S3Record,
    /// A QingStor-style event.
    QingStor,
    /// Made by imgfunc itself, e.g. a direct invocation.
    Internal,
}

/// One event on one object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// What happened.
    pub event_type: EventType,
    /// The bucket the object is in.
    pub bucket: String,
    /// The object key, decoded: `photos/a b.jpg`, never `photos%2Fa+b.jpg`.
    pub key: String,
    /// Object size in bytes, when the sender gave it (not on deletes).
    pub size: Option<u64>,
    /// The object's ETag without surrounding quotes, when given.
    pub etag: Option<String>,
    /// Which format the event arrived in.
    pub source: EventSource,
}

impl Event {
    /// An event made by imgfunc itself, for direct invocation.
    pub fn internal(
        event_type: EventType,
        bucket: impl Into<String>,
        key: impl Into<String>,
    ) -> Event {
        Event {
            event_type,
            bucket: bucket.into(),
            key: key.into(),
            size: None,
            etag: None,
            source: EventSource::Internal,
        }
    }
}

/// The events of one request body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedEvents {
    /// The events to act on, in the order they were sent.
    pub events: Vec<Event>,
    /// The names of the records that were not object events to act on, such
    /// as `s3:ObjectAccessed:Get` or `s3:TestEvent`.
    pub skipped: Vec<String>,
}

/// Parses a request body of either format. Errors name the field at fault,
/// e.g. `Records[0].s3.object.key`.
pub fn parse_body(body: &[u8]) -> Result<ParsedEvents, EventError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| EventError::InvalidJson(e.to_string()))?;
    parse_value(&value, true)
}

/// `unwrap_sns` is false inside an SNS message, which is never wrapped twice.
fn parse_value(value: &Value, unwrap_sns: bool) -> Result<ParsedEvents, EventError> {
    match value {
        Value::Array(items) => qingstor::parse_list(items, false),
        Value::Object(fields) if fields.contains_key("Records") => s3::parse_notification(value),
        Value::Object(fields) if fields.contains_key("event_type") => {
            qingstor::parse_list(std::slice::from_ref(value), true)
        }
        Value::Object(fields) => {
            if let Some(Value::String(name)) = fields.get("Event")
                && name == "s3:TestEvent"
            {
                // AWS's test event, sent when notifications are configured.
                return Ok(ParsedEvents {
                    events: Vec::new(),
                    skipped: vec![name.clone()],
                });
            }
            if unwrap_sns && let Some(Value::String(kind)) = fields.get("Type") {
                return s3::parse_sns(kind, fields, |message| parse_value(message, false));
            }
            Err(EventError::unknown_object(fields))
        }
        other => Err(EventError::UnknownFormat {
            found: fields::kind(other).to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unrecognised_bodies_say_what_is_expected() {
        let err = parse_body(b"{\"records\": []}").unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("unrecognised event body (found records)"),
            "{text}"
        );
        assert!(text.contains("\"Records\""), "{text}");

        let err = parse_body(b"\"create_object\"").unwrap_err();
        assert!(err.to_string().contains("found a string"), "{err}");

        let err = parse_body(b"{\"event_type\": ").unwrap_err();
        assert!(matches!(err, EventError::InvalidJson(_)), "{err}");
        assert!(err.to_string().starts_with("invalid JSON: "), "{err}");
    }

    #[test]
    fn internal_events_carry_no_size_or_etag() {
        let event = Event::internal(EventType::CreateObject, "photos", "a b.jpg");
        assert_eq!(event.source, EventSource::Internal);
        assert_eq!(event.key, "a b.jpg");
        assert_eq!((event.size, event.etag), (None, None));
    }
}
