//! S3 event notifications: `{"Records": [...]}`.
//!
//! The shape is AWS's, which MinIO, Ceph RGW and RustFS copy. Only
//! `Records[].eventName`, `Records[].s3.bucket.name`, `Records[].s3.object.key`
//! and, when present, `size` and `eTag` (`etag` in older Ceph RGW) are read; MinIO's top-level
//! `EventName` and `Key` repeat the first record and are ignored.

use percent_encoding::percent_decode_str;
use serde_json::{Map, Value};

use super::error::EventError;
use super::fields::{At, check_key, describe, etag};
use super::{Event, EventSource, ParsedEvents};
use crate::rules::EventType;

/// The event type of an S3 event name, with or without the `s3:` prefix
/// (AWS sends `ObjectCreated:Put`, MinIO `s3:ObjectCreated:Put`):
///
/// - `ObjectCreated:CompleteMultipartUpload` → `complete_multipart`
/// - any other `ObjectCreated:*` (`Put`, `Post`, `Copy`) → `create_object`,
///   except MinIO's metadata-only `PutTagging`, `DeleteTagging`,
///   `PutRetention` and `PutLegalHold`, which change no pixels
/// - `ObjectRemoved:*` → `delete_object`
/// - anything else (`ObjectAccessed:*`, `ObjectTagging:*`, `TestEvent`,
///   lifecycle, replication) → `None`: skipped.
pub fn event_type_for(event_name: &str) -> Option<EventType> {
    let name = event_name.strip_prefix("s3:").unwrap_or(event_name);
    let (category, action) = name.split_once(':').unwrap_or((name, ""));
    match (category, action) {
        ("ObjectCreated", "CompleteMultipartUpload") => Some(EventType::CompleteMultipart),
        ("ObjectCreated", "PutTagging" | "DeleteTagging" | "PutRetention" | "PutLegalHold") => None,
        ("ObjectCreated", _) => Some(EventType::CreateObject),
        ("ObjectRemoved", _) => Some(EventType::DeleteObject),
        _ => None,
    }
}

/// Decodes a key as S3 notifications encode it: form-style, with `+` for a
/// space. `+` is replaced before percent-decoding, so `%2B` stays a `+`.
pub fn decode_key(raw: &str) -> Result<String, &'static str> {
    let spaced = raw.replace('+', " ");
    percent_decode_str(&spaced)
        .decode_utf8()
        .map(|key| key.into_owned())
        .map_err(|_| "not valid UTF-8 after percent-decoding")
}

/// Parses `{"Records": [...]}`.
pub(crate) fn parse_notification(value: &Value) -> Result<ParsedEvents, EventError> {
    let records = match value.get("Records") {
        Some(Value::Array(records)) => records.as_slice(),
        None | Some(Value::Null) => &[],
        Some(other) => {
            return Err(EventError::WrongType {
                field: "Records".into(),
                expected: "a list of records",
                found: describe(other),
            });
        }
    };
    let mut parsed = ParsedEvents::default();
    for (i, record) in records.iter().enumerate() {
        let path = format!("Records[{i}]");
        if !record.is_object() {
            return Err(EventError::WrongType {
                field: path,
                expected: "an object",
                found: describe(record),
            });
        }
        let record = At::new(record, &path);
        let name = record.string("eventName")?;
        match event_type_for(name) {
            Some(event_type) => parsed.events.push(parse_record(record, event_type)?),
            None => parsed.skipped.push(name.to_string()),
        }
    }
    Ok(parsed)
}

fn parse_record(record: At<'_>, event_type: EventType) -> Result<Event, EventError> {
    let s3_path = record.field_path("s3");
    let s3 = At::new(record.object("s3")?, &s3_path);
    let bucket_path = s3.field_path("bucket");
    let bucket = At::new(s3.object("bucket")?, &bucket_path);
    let object_path = s3.field_path("object");
    let object = At::new(s3.object("object")?, &object_path);

    let raw_key = object.string("key")?;
    let key_field = object.field_path("key");
    // Ceph RGW puts the object's name in as it is (its notifications set
    // the key from the object's name, unencoded); AWS, MinIO and RustFS
    // encode it.
    let key = if record.optional_string("eventSource")? == Some("ceph:s3") {
        raw_key.to_string()
    } else {
        decode_key(raw_key).map_err(|reason| EventError::InvalidKey {
            field: key_field.clone(),
            key: raw_key.to_string(),
            reason,
        })?
    };
    check_key(&key, key_field)?;
    Ok(Event {
        event_type,
        bucket: bucket.string("name")?.to_string(),
        key,
        size: object.optional_size("size")?,
        // Older Ceph RGW releases spell it `etag`.
        etag: match object.optional_string("eTag")? {
            Some(tag) => etag(Some(tag), || object.field_path("eTag"))?,
            None => etag(object.optional_string("etag")?, || {
                object.field_path("etag")
            })?,
        },
        source: EventSource::S3Record,
    })
}

/// An SNS message (how AWS delivers S3 events to HTTP endpoints): the S3
/// notification is the JSON string in `Message` of a `Notification`. Other
/// SNS messages, such as `SubscriptionConfirmation`, are skipped as
/// `sns:<Type>`.
pub(crate) fn parse_sns(
    kind: &str,
    fields: &Map<String, Value>,
    parse_message: impl FnOnce(&Value) -> Result<ParsedEvents, EventError>,
) -> Result<ParsedEvents, EventError> {
    if !fields.contains_key("TopicArn") {
        return Err(EventError::unknown_object(fields));
    }
    if kind == "SubscriptionConfirmation" {
        // Only the endpoint sees the token, so the user must have it to
        // confirm the subscription (visiting the URL, or ConfirmSubscription
        // with the token): it is logged, not fetched, since anyone who can
        // reach this endpoint could send the message.
        // Whole (an SNS URL runs to about 300 characters), within reason.
        let text = |name: &str| match fields.get(name) {
            Some(Value::String(s)) => s.chars().take(2048).collect(),
            _ => String::new(),
        };
        // Debug-printed, so that no control character can forge a line.
        tracing::warn!(
            topic = ?text("TopicArn"),
            subscribe_url = ?text("SubscribeURL"),
            "SNS asks to confirm this endpoint's subscription: if SubscribeURL is an \
             https://sns.<region>.amazonaws.com address for your topic, open it (or call \
             ConfirmSubscription with its token) to start receiving events; anyone who can \
             reach this endpoint could have sent it"
        );
    }
    if kind != "Notification" {
        return Ok(ParsedEvents {
            events: Vec::new(),
            skipped: vec![format!("sns:{kind}")],
        });
    }
    let message = match fields.get("Message") {
        Some(Value::String(message)) => message,
        Some(other) => {
            return Err(EventError::WrongType {
                field: "Message".into(),
                expected: "a string holding the S3 notification",
                found: describe(other),
            });
        }
        None => {
            return Err(EventError::MissingField {
                field: "Message".into(),
            });
        }
    };
    let message: Value = serde_json::from_str(message)
        .map_err(|e| EventError::InvalidJson(format!("SNS Message: {e}")))?;
    parse_message(&message)
}

#[cfg(test)]
mod tests {
    use super::super::parse_body;
    use super::*;
    use serde_json::json;

    /// A record as MinIO (RELEASE.2024) sends it, with its top-level
    /// `EventName` and `Key`.
    fn minio(event_name: &str, key: &str) -> Value {
        json!({
          "EventName": event_name,
          "Key": format!("images/{key}"),
          "Records": [{
            "eventVersion": "2.0",
            "eventSource": "minio:s3",
            "awsRegion": "",
            "eventTime": "2024-05-01T10:00:00.123Z",
            "eventName": event_name,
            "userIdentity": {"principalId": "minioadmin"},
            "requestParameters": {"principalId": "minioadmin", "region": "", "sourceIPAddress": "172.17.0.1"},
            "responseElements": {
              "x-amz-id-2": "dd9025bab4ad464b049177c95eb6ebf374d3b3fd1af9251148b658df7ac2e3e8",
              "x-amz-request-id": "17CB4E4D3F1C2A39",
              "x-minio-deployment-id": "4ad4c44e-7d56-4b1b-a5f4-c1a6a8a1c0f2",
              "x-minio-origin-endpoint": "http://172.17.0.2:9000"
            },
            "s3": {
              "s3SchemaVersion": "1.0",
              "configurationId": "Config",
              "bucket": {"name": "images", "ownerIdentity": {"principalId": "minioadmin"}, "arn": "arn:aws:s3:::images"},
              "object": {
                "key": key,
                "size": 48213,
                "eTag": "9b2cf535f27731c974343645a3985328",
                "contentType": "image/jpeg",
                "userMetadata": {"content-type": "image/jpeg"},
                "sequencer": "17CB4E4D3F4C6B1E"
              }
            },
            "source": {"host": "172.17.0.1", "port": "", "userAgent": "MinIO (linux; amd64) minio-go/v7.0.70"}
          }]
        })
    }

    /// Two records as AWS documents them (no `s3:` prefix on eventName).
    fn aws() -> Value {
        json!({"Records": [
          {
            "eventVersion": "2.1",
            "eventSource": "aws:s3",
            "awsRegion": "us-west-2",
            "eventTime": "1970-01-01T00:00:00.000Z",
            "eventName": "ObjectCreated:Put",
            "userIdentity": {"principalId": "AIDAJDPLRKLG7UEXAMPLE"},
            "requestParameters": {"sourceIPAddress": "127.0.0.1"},
            "responseElements": {"x-amz-request-id": "C3D13FE58DE4C810", "x-amz-id-2": "FMyUVURIY8/IgAtTv8xRjskZQpcIZ9KG4V5Wp6S7S/JRWeUWerMUE5JgHvANOjpD"},
            "s3": {
              "s3SchemaVersion": "1.0",
              "configurationId": "testConfigRule",
              "bucket": {"name": "mybucket", "ownerIdentity": {"principalId": "A3NL1KOZZKExample"}, "arn": "arn:aws:s3:::mybucket"},
              "object": {"key": "photos/Happy+Face%2B1.jpg", "size": 1024, "eTag": "d41d8cd98f00b204e9800998ecf8427e", "versionId": "096fKKXTRTtl3on89fVO.nfljtsv6qko", "sequencer": "0055AED6DCD90281E5"}
            }
          },
          {
            "eventVersion": "2.1",
            "eventSource": "aws:s3",
            "awsRegion": "us-west-2",
            "eventTime": "1970-01-01T00:00:01.000Z",
            "eventName": "ObjectRemoved:DeleteMarkerCreated",
            "s3": {
              "s3SchemaVersion": "1.0",
              "bucket": {"name": "mybucket", "arn": "arn:aws:s3:::mybucket"},
              "object": {"key": "old.jpg", "versionId": "3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY", "sequencer": "0055AED6DCD90281E6"}
            }
          }
        ]})
    }

    fn parse(value: &Value) -> Result<ParsedEvents, EventError> {
        parse_body(value.to_string().as_bytes())
    }

    #[test]
    fn minio_record() {
        let parsed = parse(&minio("s3:ObjectCreated:Put", "photos%2Fa.jpg")).unwrap();
        assert!(parsed.skipped.is_empty());
        assert_eq!(
            parsed.events,
            [Event {
                event_type: EventType::CreateObject,
                bucket: "images".into(),
                key: "photos/a.jpg".into(),
                size: Some(48213),
                etag: Some("9b2cf535f27731c974343645a3985328".into()),
                source: EventSource::S3Record,
            }]
        );
    }

    #[test]
    fn aws_records() {
        let parsed = parse(&aws()).unwrap();
        assert_eq!(parsed.events.len(), 2);
        let created = &parsed.events[0];
        assert_eq!(created.event_type, EventType::CreateObject);
        assert_eq!(created.bucket, "mybucket");
        assert_eq!(created.key, "photos/Happy Face+1.jpg");
        assert_eq!(created.size, Some(1024));
        let removed = &parsed.events[1];
        assert_eq!(removed.event_type, EventType::DeleteObject);
        assert_eq!(removed.key, "old.jpg");
        assert_eq!(removed.size, None);
        assert_eq!(removed.etag, None);
    }

    #[test]
    fn keys_are_decoded() {
        for (raw, key) in [
            ("a+b.jpg", "a b.jpg"),
            ("a%2Bb.jpg", "a+b.jpg"),
            ("a%2B+b.jpg", "a+ b.jpg"),
            ("%E6%B0%B4.jpg", "水.jpg"),
            ("photos%2Fa.jpg", "photos/a.jpg"),
            (
                "photos/2024/%E6%B0%B4+%E5%8D%B0.png",
                "photos/2024/水 印.png",
            ),
            ("100%25.jpg", "100%.jpg"),
            ("plain.jpg", "plain.jpg"),
        ] {
            let parsed = parse(&minio("s3:ObjectCreated:Put", raw)).unwrap();
            assert_eq!(parsed.events[0].key, key, "{raw}");
        }
    }

    #[test]
    fn event_names_map_with_or_without_prefix() {
        for (name, expected) in [
            ("s3:ObjectCreated:Put", Some(EventType::CreateObject)),
            ("ObjectCreated:Put", Some(EventType::CreateObject)),
            ("s3:ObjectCreated:Post", Some(EventType::CreateObject)),
            ("s3:ObjectCreated:Copy", Some(EventType::CreateObject)),
            (
                "s3:ObjectCreated:CompleteMultipartUpload",
                Some(EventType::CompleteMultipart),
            ),
            (
                "ObjectCreated:CompleteMultipartUpload",
                Some(EventType::CompleteMultipart),
            ),
            ("s3:ObjectRemoved:Delete", Some(EventType::DeleteObject)),
            (
                "ObjectRemoved:DeleteMarkerCreated",
                Some(EventType::DeleteObject),
            ),
            ("s3:ObjectCreated:PutTagging", None),
            ("s3:ObjectCreated:PutRetention", None),
            ("s3:ObjectAccessed:Get", None),
            ("s3:ObjectAccessed:Head", None),
            ("s3:ObjectTagging:Put", None),
            ("s3:TestEvent", None),
            ("s3:LifecycleExpiration:Delete", None),
            ("", None),
        ] {
            assert_eq!(event_type_for(name), expected, "{name}");
        }
    }

    #[test]
    fn other_event_names_are_skipped_not_errors() {
        let mut body = minio("s3:ObjectAccessed:Get", "a.jpg");
        let created = minio("s3:ObjectCreated:Put", "b.jpg")["Records"][0].clone();
        body["Records"].as_array_mut().unwrap().push(created);
        let parsed = parse(&body).unwrap();
        assert_eq!(parsed.skipped, ["s3:ObjectAccessed:Get"]);
        assert_eq!(parsed.events.len(), 1);
        assert_eq!(parsed.events[0].key, "b.jpg");
    }

    #[test]
    fn ceph_keys_are_taken_as_they_are_and_others_decoded() {
        for key in ["Happy Face+1.jpg", "100%.jpg", "dir/a%2Bb.jpg"] {
            let mut body = minio("s3:ObjectCreated:Put", key);
            body["Records"][0]["eventSource"] = json!("ceph:s3");
            body["Records"][0]["s3"]["object"]["size"] = json!("48213");
            let parsed = parse(&body).unwrap();
            assert_eq!(parsed.events[0].key, key);
        }
        // The same key from MinIO is read as encoded.
        let parsed = parse(&minio("s3:ObjectCreated:Put", "Happy+Face%2B1.jpg")).unwrap();
        assert_eq!(parsed.events[0].key, "Happy Face+1.jpg");
    }

    #[test]
    fn aws_test_event_is_skipped() {
        let parsed = parse(&json!({
            "Service": "Amazon S3", "Event": "s3:TestEvent", "Time": "2024-05-01T10:00:00.000Z",
            "Bucket": "mybucket", "RequestId": "5582815E1AEA5ADF", "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3eKxsPzbB9wrR+YstdA6Knx4Ip8EXAMPLE"
        }))
        .unwrap();
        assert!(parsed.events.is_empty());
        assert_eq!(parsed.skipped, ["s3:TestEvent"]);
        // Any other `Event` is no test event: an unknown body, refused.
        let err =
            parse(&json!({"Event": "anything", "bucket_name": "photos", "object_key": "a.jpg"}))
                .unwrap_err();
        assert!(err.to_string().contains("Event"), "{err}");
    }

    #[test]
    fn sns_wrapped_notification() {
        let parsed = parse(&json!({
            "Type": "Notification",
            "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
            "TopicArn": "arn:aws:sns:us-west-2:123456789012:MyTopic",
            "Subject": "Amazon S3 Notification",
            "Message": aws().to_string(),
            "Timestamp": "2024-05-01T10:00:00.000Z"
        }))
        .unwrap();
        assert_eq!(parsed.events.len(), 2);

        let parsed = parse(&json!({
            "Type": "SubscriptionConfirmation", "TopicArn": "arn:aws:sns:us-west-2:123456789012:MyTopic",
            "SubscribeURL": "https://sns.us-west-2.amazonaws.com/?Action=ConfirmSubscription"
        }))
        .unwrap();
        assert_eq!(parsed.skipped, ["sns:SubscriptionConfirmation"]);
    }

    #[test]
    fn errors_name_the_field() {
        let mut body = minio("s3:ObjectCreated:Put", "a.jpg");
        body["Records"][0]["s3"]["object"]
            .as_object_mut()
            .unwrap()
            .remove("key");
        assert_eq!(
            parse(&body).unwrap_err().to_string(),
            "Records[0].s3.object.key: required field is missing"
        );

        let mut body = minio("s3:ObjectCreated:Put", "a.jpg");
        body["Records"][0]["s3"]["bucket"]["name"] = json!(7);
        assert_eq!(
            parse(&body).unwrap_err().to_string(),
            "Records[0].s3.bucket.name: expected a string, got 7"
        );

        let mut body = minio("s3:ObjectCreated:Put", "a.jpg");
        body["Records"][0]["s3"]["object"]["size"] = json!(-3);
        assert!(matches!(parse(&body).unwrap_err(),
            EventError::WrongType { field, .. } if field == "Records[0].s3.object.size"));

        let mut body = minio("s3:ObjectCreated:Put", "a.jpg");
        body["Records"][0]
            .as_object_mut()
            .unwrap()
            .remove("eventName");
        assert_eq!(
            parse(&body).unwrap_err(),
            EventError::MissingField {
                field: "Records[0].eventName".into()
            }
        );

        assert!(matches!(parse(&json!({"Records": "x"})).unwrap_err(),
            EventError::WrongType { field, .. } if field == "Records"));
    }

    #[test]
    fn invalid_keys_are_refused() {
        let err = parse(&minio("s3:ObjectCreated:Put", "%FF%FE.jpg")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Records[0].s3.object.key: invalid object key `%FF%FE.jpg`: not valid UTF-8 after \
             percent-decoding"
        );
        let err = parse(&minio("s3:ObjectCreated:Put", "")).unwrap_err();
        assert_eq!(
            err,
            EventError::Empty {
                field: "Records[0].s3.object.key".into()
            }
        );
        let long = "a".repeat(1025);
        assert!(matches!(
            parse(&minio("s3:ObjectCreated:Put", &long)).unwrap_err(),
            EventError::InvalidKey {
                reason: "longer than 1024 bytes",
                ..
            }
        ));
    }

    #[test]
    fn quoted_etag_and_string_size_are_accepted() {
        let mut body = minio("s3:ObjectCreated:Put", "a.jpg");
        body["Records"][0]["s3"]["object"]["eTag"] = json!("\"abc\"");
        body["Records"][0]["s3"]["object"]["size"] = json!("12");
        let event = &parse(&body).unwrap().events[0];
        assert_eq!(event.etag.as_deref(), Some("abc"));
        assert_eq!(event.size, Some(12));
    }

    #[test]
    fn an_etag_longer_than_any_store_makes_is_refused_naming_it() {
        // It would travel into the journal and into every result.
        let mut body = minio("s3:ObjectCreated:Put", "a.jpg");
        body["Records"][0]["s3"]["object"]["eTag"] = json!("e".repeat(257));
        let err = parse(&body).unwrap_err().to_string();
        assert_eq!(err, "Records[0].s3.object.eTag: 257 bytes, at most 256");
        body["Records"][0]["s3"]["object"]["eTag"] = json!("e".repeat(256));
        assert_eq!(
            parse(&body).unwrap().events[0]
                .etag
                .as_ref()
                .map(String::len),
            Some(256)
        );
        let qingstor = json!({"event_type": "create_object", "bucket_name": "photos",
                              "object_key": "a.jpg", "etag": "e".repeat(300)});
        let err = crate::events::parse_body(qingstor.to_string().as_bytes()).unwrap_err();
        assert_eq!(err.to_string(), "etag: 300 bytes, at most 256");
    }

    #[test]
    fn ceph_s_lower_case_etag_is_read() {
        let mut body = minio("s3:ObjectCreated:Put", "a.jpg");
        let object = body["Records"][0]["s3"]["object"].as_object_mut().unwrap();
        object.remove("eTag");
        object.insert("etag".into(), json!("def"));
        let event = &parse(&body).unwrap().events[0];
        assert_eq!(event.etag.as_deref(), Some("def"));
    }
}
