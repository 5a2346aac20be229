//! The rule JSON as users write it, before validation.
//!
//! These types accept what QingStor accepts: unknown fields are ignored,
//! `event_types` and `object_filters` may be one string or a list, and every
//! field of a notification is optional here so that validation, not serde,
//! says which one is missing.

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The body of QingStor's `PUT /?notification`: `{"notifications": [...]}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(expecting = "an object with a list of notifications")]
pub struct NotificationSet {
    /// The rules, each with an id unique in the set.
    pub notifications: Vec<RawNotification>,
}

/// A deployable rule file in `functions/`: the notification body plus the
/// bucket it applies to, `{"bucket": "photos", "notifications": [...]}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(expecting = "an object with a bucket and a list of notifications")]
pub struct RuleFile {
    /// The bucket whose events the rules apply to.
    pub bucket: String,
    /// The rules, as in [`NotificationSet`].
    pub notifications: Vec<RawNotification>,
}

/// One notification rule as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(expecting = "a notification rule: an object with id, event_types, cloudfunc and more")]
pub struct RawNotification {
    /// Required, unique among the bucket's rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(
        default,
        deserialize_with = "one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    /// Required: event type names; one string or a list.
    pub event_types: Vec<String>,
    #[serde(
        default,
        deserialize_with = "one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    /// Glob patterns on the key; one string or a list; empty matches all.
    pub object_filters: Vec<String>,
    /// Required: `image` or `notifier`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloudfunc: Option<String>,
    /// Arguments of the cloudfunc; required for `image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloudfunc_args: Option<RawCloudFuncArgs>,
    /// Where results are POSTed; required for `notifier`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify_url: Option<String>,
}

/// `cloudfunc_args` as written; only the `image` cloudfunc reads them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(expecting = "an object of action, key_prefix, key_seprate and save_bucket")]
pub struct RawCloudFuncArgs {
    /// The action pipeline, e.g. `resize:w_300|format:t_webp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Output key prefix; `gen` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_prefix: Option<String>,
    /// Between prefix and original key; `_` when absent (QingStor's spelling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_seprate: Option<String>,
    /// Output bucket; the original's when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub save_bucket: Option<String>,
}

/// Reads a string, a list of strings or `null` (an empty list).
fn one_or_many<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    struct OneOrMany;

    impl<'de> Visitor<'de> for OneOrMany {
        type Value = Vec<String>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string or a list of strings")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(vec![v.to_string()])
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
            while let Some(item) = seq.next_element::<String>()? {
                items.push(item);
            }
            Ok(items)
        }
    }

    deserializer.deserialize_any(OneOrMany)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_and_single_strings_are_both_accepted() {
        let one: RawNotification =
            serde_json::from_str(r#"{"event_types": "create_object", "object_filters": "*.jpg"}"#)
                .unwrap();
        assert_eq!(one.event_types, ["create_object"]);
        assert_eq!(one.object_filters, ["*.jpg"]);

        let many: RawNotification = serde_json::from_str(
            r#"{"event_types": ["create_object", "delete_object"], "object_filters": null}"#,
        )
        .unwrap();
        assert_eq!(many.event_types, ["create_object", "delete_object"]);
        assert!(many.object_filters.is_empty());
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let raw: RawNotification =
            serde_json::from_str(r#"{"id": "a", "colour": "blue", "cloudfunc_args": {"x": 1}}"#)
                .unwrap();
        assert_eq!(raw.id.as_deref(), Some("a"));
        assert_eq!(raw.cloudfunc_args, Some(RawCloudFuncArgs::default()));
    }

    #[test]
    fn wrong_type_names_what_was_expected() {
        let err = serde_json::from_str::<RawNotification>(r#"{"event_types": 5}"#).unwrap_err();
        assert!(
            err.to_string()
                .contains("expected a string or a list of strings"),
            "{err}"
        );
    }

    #[test]
    fn serializes_to_the_documented_shape() {
        let set = NotificationSet {
            notifications: vec![RawNotification {
                id: Some("thumbs".into()),
                event_types: vec!["create_object".into()],
                cloudfunc: Some("image".into()),
                cloudfunc_args: Some(RawCloudFuncArgs {
                    action: Some("resize:w_300".into()),
                    ..RawCloudFuncArgs::default()
                }),
                ..RawNotification::default()
            }],
        };
        assert_eq!(
            serde_json::to_value(&set).unwrap(),
            serde_json::json!({"notifications": [{
                "id": "thumbs",
                "event_types": ["create_object"],
                "cloudfunc": "image",
                "cloudfunc_args": {"action": "resize:w_300"}
            }]})
        );
    }
}
