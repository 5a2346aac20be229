//! QingStor-style events: one object, or a list of them.
//!
//! ```json
//! {"event_type": "create_object", "bucket_name": "photos",
//!  "object_key": "photos/a b.jpg", "size": 123, "etag": "9b2c..."}
//! ```
//!
//! `event_type` is one of the rule event types; `bucket_name` and
//! `object_key` are required and plain text (the key is not URL-encoded);
//! `size` (bytes) and `etag` are optional. Other fields are ignored.

use serde_json::Value;

use super::error::EventError;
use super::fields::{At, check_key, describe, etag};
use super::{Event, EventSource, ParsedEvents};
use crate::rules::EventType;

/// Parses a list of events. `bare` is a single event sent as an object
/// rather than a list: its field paths carry no index, as in the body sent.
pub(crate) fn parse_list(items: &[Value], bare: bool) -> Result<ParsedEvents, EventError> {
    let mut events = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let path = if bare {
            String::new()
        } else {
            format!("[{i}]")
        };
        if !item.is_object() {
            return Err(EventError::WrongType {
                field: path,
                expected: "a QingStor event object",
                found: describe(item),
            });
        }
        events.push(parse_event(At::new(item, &path))?);
    }
    Ok(ParsedEvents {
        events,
        skipped: Vec::new(),
    })
}

fn parse_event(event: At<'_>) -> Result<Event, EventError> {
    let name = event.string("event_type")?;
    let event_type = EventType::parse(name).map_err(|source| EventError::UnknownEventType {
        field: event.field_path("event_type"),
        source,
    })?;
    let bucket = event.string("bucket_name")?.to_string();
    let key = event.string("object_key")?.to_string();
    check_key(&key, event.field_path("object_key"))?;
    Ok(Event {
        event_type,
        bucket,
        key,
        size: event.optional_size("size")?,
        etag: etag(event.optional_string("etag")?, || event.field_path("etag"))?,
        source: EventSource::QingStor,
    })
}

#[cfg(test)]
mod tests {
    use super::super::parse_body;
    use super::*;
    use serde_json::json;

    fn parse(value: &Value) -> Result<ParsedEvents, EventError> {
        parse_body(value.to_string().as_bytes())
    }

    #[test]
    fn single_event() {
        let parsed = parse(&json!({
            "event_type": "create_object", "bucket_name": "photos",
            "object_key": "photos/a+b%2B水.jpg", "size": 123, "etag": "abc", "zone": "pek3b"
        }))
        .unwrap();
        assert_eq!(
            parsed.events,
            [Event {
                event_type: EventType::CreateObject,
                bucket: "photos".into(),
                key: "photos/a+b%2B水.jpg".into(),
                size: Some(123),
                etag: Some("abc".into()),
                source: EventSource::QingStor,
            }],
            "the key is taken as written, not URL-decoded"
        );
        assert!(parsed.skipped.is_empty());
    }

    #[test]
    fn list_of_events_with_optional_fields_absent() {
        let parsed = parse(&json!([
            {"event_type": "delete_object", "bucket_name": "photos", "object_key": "a.jpg"},
            {"event_type": "complete_multipart", "bucket_name": "photos", "object_key": "b.jpg",
             "size": null, "etag": ""}
        ]))
        .unwrap();
        assert_eq!(parsed.events.len(), 2);
        assert_eq!(parsed.events[0].event_type, EventType::DeleteObject);
        assert_eq!(parsed.events[1].event_type, EventType::CompleteMultipart);
        assert_eq!(parsed.events[1].size, None);
        assert_eq!(parsed.events[1].etag, None);
        assert!(parse(&json!([])).unwrap().events.is_empty());
    }

    #[test]
    fn unknown_event_type_lists_the_allowed() {
        let err = parse(&json!({"event_type": "put", "bucket_name": "b", "object_key": "k"}))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "event_type: unknown event type `put`; allowed: create_object, delete_object, \
             abort_multipart, complete_multipart"
        );
    }

    #[test]
    fn missing_and_wrong_fields_are_named() {
        let err = parse(&json!({"event_type": "create_object", "object_key": "k"})).unwrap_err();
        assert_eq!(err.to_string(), "bucket_name: required field is missing");

        let err = parse(&json!([
            {"event_type": "create_object", "bucket_name": "b", "object_key": "k"},
            {"event_type": "create_object", "bucket_name": "b"}
        ]))
        .unwrap_err();
        assert_eq!(err.to_string(), "[1].object_key: required field is missing");
        // A list of one is still a list: the path says which item.
        let err = parse(&json!([{"event_type": "create_object", "bucket_name": "b"}])).unwrap_err();
        assert_eq!(err.to_string(), "[0].object_key: required field is missing");

        let err = parse(&json!({"event_type": "create_object", "bucket_name": "b",
                                "object_key": "k", "size": 1.5}))
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "size: expected a size in bytes (a non-negative integer), got 1.5"
        );

        let err = parse(&json!([1])).unwrap_err();
        assert!(matches!(err, EventError::WrongType { field, .. } if field == "[0]"));

        let err = parse(&json!({"event_type": "create_object", "bucket_name": "",
                                "object_key": "k"}))
        .unwrap_err();
        assert_eq!(
            err,
            EventError::Empty {
                field: "bucket_name".into()
            }
        );
    }
}
