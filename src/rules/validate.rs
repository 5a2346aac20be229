//! Turning rule JSON into [`Rule`]s: every check happens here, once, when a
//! rule set is set or loaded, and every error names the field at fault.

use std::collections::HashSet;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::error::RuleError;
use super::event_type::EventType;
use super::model::{RawCloudFuncArgs, RawNotification};
use super::rule::{
    CloudFunc, DEFAULT_KEY_PREFIX, DEFAULT_KEY_SEPRATE, ImageArgs, ObjectFilters, Rule,
};
use crate::action::{Action, Op};

/// Validates a QingStor notification body, `{"notifications": [...]}`, for
/// `bucket`. Field paths in errors start at the body:
/// `notifications[1].event_types[0]`.
pub fn parse_notifications(body: &[u8], bucket: &str) -> Result<Vec<Rule>, RuleError> {
    notifications_from_body(body, bucket).map(|(_, rules)| rules)
}

/// Validates a deployable rule file, `{"bucket": "photos", "notifications":
/// [...]}`, and returns the bucket with its rules.
pub fn parse_rule_file(bytes: &[u8]) -> Result<(String, Vec<Rule>), RuleError> {
    rule_file_from_bytes(bytes).map(|(bucket, _, rules)| (bucket, rules))
}

/// Checks the `save:` targets of `action` by the local store's rules (a
/// bucket name, and a key that is a relative path of plain segments), so
/// that a save behaves the same on either store and never leaves its
/// bucket's folder.
pub fn check_save_targets(action: &crate::action::Action) -> Result<(), crate::store::StoreError> {
    for op in &action.ops {
        if let crate::action::Op::Save(save) = op {
            crate::store::validate_bucket(&save.bucket)?;
            crate::store::validate_local_key(&save.key)?;
        }
    }
    Ok(())
}

/// Checks that `name` can be a bucket name, which is also a file name in the
/// state directory (`<name>.json`, at most 255 bytes): 1 to 250 letters,
/// digits, `.`, `-` or `_`, starting with
/// a letter or digit. That is looser than S3 (lowercase, 3 to 63) so that
/// every bucket a store accepts fits, and strict enough that no name escapes
/// a directory.
pub fn validate_bucket_name(name: &str) -> Result<(), RuleError> {
    /// A file name's 255 bytes, less `.json`.
    const MAX_RULE_BUCKET: usize = 250;
    let valid_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    let starts_well = name.starts_with(|c: char| c.is_ascii_alphanumeric());
    if name.len() <= MAX_RULE_BUCKET && valid_chars && starts_well {
        Ok(())
    } else {
        Err(RuleError::new(
            "bucket",
            format!(
                "invalid bucket name `{}`: use 1 to {MAX_RULE_BUCKET} letters, digits, `.`, \
                 `-` or `_`, starting with a letter or digit",
                crate::shown(name)
            ),
        ))
    }
}

impl Rule {
    /// Validates one notification object (the inline rule of a direct
    /// invocation) for `bucket`. Field paths in errors start at the rule:
    /// `cloudfunc_args.action`.
    pub fn from_json(value: &Value, bucket: &str) -> Result<Rule, RuleError> {
        let raw: RawNotification = deserialize_at(value)?;
        rule_from_raw(raw, bucket)
    }
}

/// The parsed body and its rules, for callers that keep the body as set.
pub(crate) fn notifications_from_body(
    body: &[u8],
    bucket: &str,
) -> Result<(Value, Vec<Rule>), RuleError> {
    let value = parse_json(body)?;
    let Value::Object(fields) = &value else {
        return Err(RuleError::new(
            "body",
            format!(
                "expected a JSON object {{\"notifications\": [...]}}, got {}",
                kind(&value)
            ),
        ));
    };
    let (_, rules) = notifications_in(fields, bucket)?;
    Ok((value, rules))
}

/// The bucket, the notification objects as written and their rules.
pub(crate) fn rule_file_from_bytes(
    bytes: &[u8],
) -> Result<(String, Vec<Value>, Vec<Rule>), RuleError> {
    let value = parse_json(bytes)?;
    let Value::Object(fields) = &value else {
        return Err(RuleError::new(
            "body",
            format!(
                "expected a JSON object {{\"bucket\": ..., \"notifications\": [...]}}, got {}",
                kind(&value)
            ),
        ));
    };
    let bucket = match fields.get("bucket") {
        Some(Value::String(bucket)) => bucket.clone(),
        None | Some(Value::Null) => {
            return Err(RuleError::new(
                "bucket",
                "required: the name of the bucket the rules apply to",
            ));
        }
        Some(other) => {
            return Err(RuleError::new(
                "bucket",
                format!("expected a string, got {}", kind(other)),
            ));
        }
    };
    validate_bucket_name(&bucket)?;
    let (items, rules) = notifications_in(fields, &bucket)?;
    Ok((bucket, items.to_vec(), rules))
}

fn parse_json(bytes: &[u8]) -> Result<Value, RuleError> {
    serde_json::from_slice(bytes).map_err(|e| RuleError::new("body", format!("invalid JSON: {e}")))
}

/// Validates the `notifications` list of a body or file, ids unique.
fn notifications_in<'a>(
    fields: &'a Map<String, Value>,
    bucket: &str,
) -> Result<(&'a [Value], Vec<Rule>), RuleError> {
    let items = match fields.get("notifications") {
        Some(Value::Array(items)) => items,
        None | Some(Value::Null) => {
            return Err(RuleError::new(
                "notifications",
                "required: a list of notification rules",
            ));
        }
        Some(other) => {
            return Err(RuleError::new(
                "notifications",
                format!("expected a list of rules, got {}", kind(other)),
            ));
        }
    };
    let mut seen = HashSet::new();
    let mut rules = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at = format!("notifications[{i}]");
        let rule = Rule::from_json(item, bucket).map_err(|e| e.under(&at))?;
        if !seen.insert(rule.id.clone()) {
            return Err(RuleError::new(
                format!("{at}.id"),
                format!(
                    "duplicate id `{}`: ids must be unique among a bucket's rules",
                    rule.id
                ),
            ));
        }
        rules.push(rule);
    }
    Ok((items, rules))
}

/// The longest rule id, percent-encoded: ids go that way into the metadata
/// of every output (the rule chain), which has a size limit.
const MAX_ID_BYTES: usize = 256;

fn rule_from_raw(raw: RawNotification, bucket: &str) -> Result<Rule, RuleError> {
    let id = match raw.id {
        Some(id) if super::id_in_metadata(&id).len() > MAX_ID_BYTES => {
            return Err(RuleError::new(
                "id",
                format!(
                    "at most {MAX_ID_BYTES} bytes once percent-encoded (ASCII letters, \
                     digits, '-', '_' and '.' are one byte each, other bytes three), \
                     got {}",
                    super::id_in_metadata(&id).len()
                ),
            ));
        }
        Some(id) if !id.trim().is_empty() => id,
        _ => return Err(RuleError::new("id", "required: a non-empty rule id")),
    };
    let event_types = event_types(&raw.event_types)?;
    let filters = ObjectFilters::new(raw.object_filters)?;
    let notify_url = match raw.notify_url {
        Some(url) if !url.trim().is_empty() => Some(notify_url(url.trim())?),
        _ => None,
    };
    let cloudfunc = match raw.cloudfunc.as_deref() {
        Some("image") => CloudFunc::Image(image_args(raw.cloudfunc_args, bucket)?),
        Some("notifier") => {
            if notify_url.is_none() {
                return Err(RuleError::new(
                    "notify_url",
                    "required for cloudfunc notifier, which POSTs the event there",
                ));
            }
            CloudFunc::Notifier
        }
        Some(other) => {
            return Err(RuleError::new(
                "cloudfunc",
                format!(
                    "unknown cloudfunc `{}`; supported: {}",
                    crate::shown(other),
                    CloudFunc::SUPPORTED
                ),
            ));
        }
        None => {
            return Err(RuleError::new(
                "cloudfunc",
                format!("required; supported: {}", CloudFunc::SUPPORTED),
            ));
        }
    };
    Ok(Rule {
        id,
        event_types,
        filters,
        cloudfunc,
        notify_url,
    })
}

/// The most rules one bucket takes: every event is matched against each,
/// and fires one invocation per match.
pub const MAX_RULES_PER_BUCKET: usize = 100;

/// The most bytes of `object_filters` patterns that run as regular
/// expressions one bucket's rules hold in all. Every event's key is matched
/// against each: a pattern the glob library cannot match as a literal, a
/// literal prefix (`photos/*`) or a literal suffix (`*.jpg`) runs as a
/// regular expression, which on a hostile pattern (`*a??…?*a??…?c`) costs
/// about 6 µs per pattern byte for a 1 KiB key. At this bound an event
/// costs at most about 25 ms to match, and a hundred rules of patterns
/// such as `uploads/originals/*.jpg` (a regular expression, matched in
/// microseconds) fit.
pub const MAX_REGEX_FILTER_BYTES_PER_BUCKET: usize = 4096;

/// Whether the glob library matches `pattern` as a regular expression
/// rather than as a literal, a literal after one leading `*`, or a literal
/// before one trailing `*`.
fn runs_as_regex(pattern: &str) -> bool {
    let meta = |p: &str| p.contains(['*', '?', '[', ']', '{', '}', '\\']);
    let after_star = pattern.strip_prefix('*').unwrap_or(pattern);
    let before_star = pattern.strip_suffix('*').unwrap_or(pattern);
    meta(after_star) && meta(before_star)
}

use super::rule::MAX_PATTERN_BYTES;

/// Refuses more than [`MAX_RULES_PER_BUCKET`] rules for one bucket, an
/// `object_filters` pattern longer than [`MAX_PATTERN_BYTES`], or more than
/// [`MAX_REGEX_FILTER_BYTES_PER_BUCKET`] of patterns that run as regular
/// expressions. Checked when rules are set or read from `functions/`, so
/// rules saved by an earlier version are loaded as they are.
pub fn check_bucket_bounds<'a>(rules: impl IntoIterator<Item = &'a Rule>) -> Result<(), RuleError> {
    let (mut count, mut bytes) = (0, 0);
    for (i, rule) in rules.into_iter().enumerate() {
        count += 1;
        for (j, pattern) in rule.filters.patterns().iter().enumerate() {
            if pattern.len() > MAX_PATTERN_BYTES {
                return Err(RuleError::new(
                    format!("notifications[{i}].object_filters"),
                    format!(
                        "pattern {j} (not counting empty ones) is {} bytes ({}): at most \
                         {MAX_PATTERN_BYTES}, the longest key",
                        pattern.len(),
                        crate::shown(pattern)
                    ),
                ));
            }
            if runs_as_regex(pattern) {
                bytes += pattern.len();
            }
        }
    }
    if count > MAX_RULES_PER_BUCKET {
        return Err(RuleError::new(
            "notifications",
            format!("{count} rules: a bucket takes at most {MAX_RULES_PER_BUCKET}"),
        ));
    }
    if bytes > MAX_REGEX_FILTER_BYTES_PER_BUCKET {
        return Err(RuleError::new(
            "notifications",
            format!(
                "the rules' object_filters hold {bytes} bytes of patterns that run as regular \
                 expressions (not a literal, `prefix*` or `*suffix`): a bucket takes at most \
                 {MAX_REGEX_FILTER_BYTES_PER_BUCKET} (every event's key is matched against each)"
            ),
        ));
    }
    Ok(())
}

/// Refuses an `image` rule on an event that leaves no object to read
/// (`delete_object`, `abort_multipart`): it would fail at every event.
/// Checked when rules are set or read from `functions/`, not when rules
/// saved by an earlier version are loaded (see [`super::RuleBook`]).
pub fn check_image_events(rules: &[Rule]) -> Result<(), RuleError> {
    for (i, rule) in rules.iter().enumerate() {
        if !matches!(rule.cloudfunc, CloudFunc::Image(_)) {
            continue;
        }
        if let Some(t) = rule
            .event_types
            .iter()
            .find(|t| matches!(t, EventType::DeleteObject | EventType::AbortMultipart))
        {
            return Err(RuleError::new(
                format!("notifications[{i}].event_types"),
                format!(
                    "`{}` leaves no object for cloudfunc image to read; image rules take \
                     create_object and complete_multipart (cloudfunc notifier reports the \
                     others)",
                    t.as_str()
                ),
            ));
        }
    }
    Ok(())
}

fn event_types(names: &[String]) -> Result<Vec<EventType>, RuleError> {
    if names.is_empty() {
        return Err(RuleError::new(
            "event_types",
            "required: one or more of create_object, delete_object, abort_multipart, \
             complete_multipart",
        ));
    }
    let mut types = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let t = EventType::parse(name)
            .map_err(|e| RuleError::new(format!("event_types[{i}]"), e.to_string()))?;
        if !types.contains(&t) {
            types.push(t);
        }
    }
    Ok(types)
}

fn notify_url(url: &str) -> Result<String, RuleError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| {
        RuleError::new(
            "notify_url",
            format!(
                "`{}` is not a valid URL ({e}); expected http://... or https://...",
                crate::shown(url)
            ),
        )
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(RuleError::new(
            "notify_url",
            format!(
                "`{}` has scheme `{}`; only http and https are supported",
                crate::shown(url),
                crate::shown(parsed.scheme())
            ),
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(RuleError::new(
            "notify_url",
            format!("`{}` has no host", crate::shown(url)),
        ));
    }
    Ok(url.to_string())
}

fn image_args(raw: Option<RawCloudFuncArgs>, bucket: &str) -> Result<ImageArgs, RuleError> {
    let raw = raw.unwrap_or_default();
    let action = match raw.action.as_deref().map(str::trim) {
        Some(action) if !action.is_empty() => Action::parse(action)
            .map_err(|e| RuleError::new("cloudfunc_args.action", e.to_string()))?,
        _ => {
            return Err(RuleError::new(
                "cloudfunc_args.action",
                "required for cloudfunc image, e.g. \"resize:w_300|format:t_webp\"",
            ));
        }
    };
    // `save:` targets are store objects: check them now, not at event time,
    // by the stricter rules of the local store (a relative path of plain
    // segments), so a rule behaves the same on either store.
    check_save_targets(&action)
        .map_err(|e| RuleError::new("cloudfunc_args.action", format!("save: {e}")))?;

    // An explicit "" is kept (no prefix, or no separator); only an absent
    // field takes the default.
    let key_prefix = raw
        .key_prefix
        .unwrap_or_else(|| DEFAULT_KEY_PREFIX.to_string());
    let key_seprate = raw
        .key_seprate
        .unwrap_or_else(|| DEFAULT_KEY_SEPRATE.to_string());
    let save_bucket = match raw.save_bucket {
        Some(b) if !b.is_empty() => {
            // The store's rules first: they are the stricter, and their
            // message says what a bucket written to may be.
            crate::store::validate_bucket(&b)
                .map_err(|e| RuleError::new("cloudfunc_args.save_bucket", e.to_string()))?;
            validate_bucket_name(&b).map_err(|e| e.renamed("cloudfunc_args.save_bucket"))?;
            Some(b)
        }
        _ => None,
    };
    // Every output key is `key_prefix + key_seprate + original key`, and an
    // original key is itself valid: check the part the rule adds now, with a
    // one-character key standing in. What depends on the key as well (a
    // first segment made too long, or reserved, by the prefix) can still
    // fail at event time.
    let example = format!("{key_prefix}{key_seprate}a.jpg");
    if let Err(e) = crate::store::validate_local_key(&format!("{key_prefix}{key_seprate}a")) {
        let reason = match e {
            crate::store::StoreError::InvalidKey { reason, .. } => reason,
            other => other.to_string(),
        };
        return Err(RuleError::new(
            "cloudfunc_args.key_prefix",
            format!(
                "key_prefix {:?} and key_seprate {:?} make output keys such as {:?}, which are \
                 not valid keys: {reason}",
                crate::shown(&key_prefix),
                crate::shown(&key_seprate),
                crate::shown(&example)
            ),
        ));
    }
    let output_bucket = save_bucket.as_deref().unwrap_or(bucket);
    // A pipeline that ends with `info` writes no output object (a `save:`
    // naming the original is refused at event time).
    let writes_output = !matches!(action.ops.last(), Some(Op::Info));
    if writes_output && key_prefix.is_empty() && key_seprate.is_empty() && output_bucket == bucket {
        return Err(RuleError::new(
            "cloudfunc_args.key_prefix",
            format!(
                "key_prefix and key_seprate are both empty, so every output would overwrite \
                 its original in bucket `{bucket}`; set a key_prefix or another save_bucket"
            ),
        ));
    }
    Ok(ImageArgs {
        action,
        key_prefix,
        key_seprate,
        save_bucket,
    })
}

/// Deserializes `value`; a type error names the field at fault by its
/// whole path (`cloudfunc_args.save_bucket`, `object_filters[1]`), which
/// serde's own message does not.
fn deserialize_at<T: DeserializeOwned>(value: &Value) -> Result<T, RuleError> {
    if !value.is_object() {
        return Err(RuleError::new(
            "",
            format!("expected a JSON object, got {}", kind(value)),
        ));
    }
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        // The crate writes the root as "."; our paths leave it empty.
        let path = if path == "." { String::new() } else { path };
        RuleError::new(path, error.into_inner().to_string())
    })
}

/// A JSON value's kind, for messages ("a string", "a list", ...).
pub(crate) fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn example() -> Value {
        json!({"notifications": [{
            "id": "thumbs",
            "event_types": ["create_object"],
            "object_filters": ["*.jpg", "photos/*"],
            "cloudfunc": "image",
            "cloudfunc_args": {"action": "resize:w_300|format:t_webp",
                               "key_prefix": "gen", "key_seprate": "_",
                               "save_bucket": "thumbs"},
            "notify_url": "http://127.0.0.1:9000/hook"}]})
    }

    fn parse(value: &Value) -> Result<Vec<Rule>, RuleError> {
        parse_notifications(value.to_string().as_bytes(), "photos")
    }

    /// The error for the design example with `f` applied to its only rule.
    fn error_with(f: impl FnOnce(&mut Map<String, Value>)) -> RuleError {
        let mut body = example();
        if let Some(rule) = body["notifications"][0].as_object_mut() {
            f(rule);
        }
        parse(&body).unwrap_err()
    }

    #[test]
    fn design_example_validates() {
        let rules = parse(&example()).unwrap();
        assert_eq!(rules.len(), 1);
        let rule = &rules[0];
        assert_eq!(rule.id, "thumbs");
        assert_eq!(rule.event_types, [EventType::CreateObject]);
        assert_eq!(rule.filters.patterns(), ["*.jpg", "photos/*"]);
        assert_eq!(
            rule.notify_url.as_deref(),
            Some("http://127.0.0.1:9000/hook")
        );
        let args = rule.image_args().unwrap();
        assert_eq!(
            args.action.to_string(),
            Action::parse("resize:w_300|format:t_webp")
                .unwrap()
                .to_string()
        );
        assert_eq!(args.key_prefix, "gen");
        assert_eq!(args.key_seprate, "_");
        assert_eq!(args.save_bucket.as_deref(), Some("thumbs"));
    }

    #[test]
    fn single_strings_and_defaults() {
        let rules = parse(&json!({"notifications": [{
            "id": "one",
            "event_types": "create_object",
            "object_filters": "*.png",
            "cloudfunc": "image",
            "cloudfunc_args": {"action": "rotate:a_90"}}]}))
        .unwrap();
        let rule = &rules[0];
        assert_eq!(rule.event_types, [EventType::CreateObject]);
        assert_eq!(rule.filters.patterns(), ["*.png"]);
        assert_eq!(rule.notify_url, None);
        let args = rule.image_args().unwrap();
        assert_eq!(args.key_prefix, DEFAULT_KEY_PREFIX);
        assert_eq!(args.key_seprate, DEFAULT_KEY_SEPRATE);
        assert_eq!(args.save_bucket, None);
        assert_eq!(args.output_key("photos/a.png"), "gen_photos/a.png");
        assert_eq!(args.output_bucket("photos"), "photos");
    }

    #[test]
    fn absent_or_empty_filters_match_everything() {
        for filters in [json!(null), json!([]), json!(""), json!([""])] {
            let rules = parse(&json!({"notifications": [{
                "id": "n", "event_types": ["delete_object"], "object_filters": filters,
                "cloudfunc": "notifier", "notify_url": "https://example.com/hook"}]}))
            .unwrap();
            assert!(rules[0].matches(EventType::DeleteObject, "any/key.bin"));
            assert!(rules[0].filters.patterns().is_empty());
        }
    }

    #[test]
    fn an_image_rule_takes_only_events_that_leave_an_object() {
        for (types, name) in [
            (json!(["create_object", "delete_object"]), "delete_object"),
            (json!(["abort_multipart"]), "abort_multipart"),
        ] {
            let rules = parse(&json!({"notifications": [
                {"id": "n", "event_types": ["delete_object"], "cloudfunc": "notifier",
                 "notify_url": "https://example.com/hook"},
                {"id": "t", "event_types": types, "cloudfunc": "image",
                 "cloudfunc_args": {"action": "resize:w_10"}}]}))
            .unwrap();
            let err = check_image_events(&rules).unwrap_err();
            assert_eq!(err.field, "notifications[1].event_types");
            assert!(
                err.to_string()
                    .contains(&format!("`{name}` leaves no object for cloudfunc image")),
                "{err}"
            );
        }
        let ok = parse(&json!({"notifications": [{
            "id": "t", "event_types": ["create_object", "complete_multipart"],
            "cloudfunc": "image", "cloudfunc_args": {"action": "resize:w_10"}}]}))
        .unwrap();
        assert!(check_image_events(&ok).is_ok());
    }

    #[test]
    fn notifier_needs_no_args() {
        let rules = parse(&json!({"notifications": [{
            "id": "n", "event_types": ["create_object", "create_object", "abort_multipart"],
            "cloudfunc": "notifier", "notify_url": "https://example.com/hook"}]}))
        .unwrap();
        assert_eq!(rules[0].cloudfunc, CloudFunc::Notifier);
        assert_eq!(
            rules[0].event_types,
            [EventType::CreateObject, EventType::AbortMultipart],
            "duplicates collapse"
        );
    }

    #[test]
    fn bad_action_names_the_field_and_the_action_error() {
        let err = error_with(|r| {
            r.insert("cloudfunc_args".into(), json!({"action": "rotate:a_45"}));
        });
        assert_eq!(err.field, "notifications[0].cloudfunc_args.action");
        let expected = Action::parse("rotate:a_45").unwrap_err().to_string();
        assert_eq!(err.message, expected);
        assert_eq!(
            err.to_string(),
            format!("notifications[0].cloudfunc_args.action: {expected}")
        );
    }

    #[test]
    fn missing_action_for_image() {
        for args in [
            json!(null),
            json!({}),
            json!({"action": ""}),
            json!({"key_prefix": "x"}),
        ] {
            let err = error_with(|r| {
                r.insert("cloudfunc_args".into(), args);
            });
            assert_eq!(err.field, "notifications[0].cloudfunc_args.action");
            assert!(
                err.message.starts_with("required for cloudfunc image"),
                "{err}"
            );
        }
    }

    #[test]
    fn unknown_event_type_lists_the_allowed() {
        let err = error_with(|r| {
            r.insert("event_types".into(), json!(["create_object", "put_object"]));
        });
        assert_eq!(err.field, "notifications[0].event_types[1]");
        assert_eq!(
            err.message,
            "unknown event type `put_object`; allowed: create_object, delete_object, \
             abort_multipart, complete_multipart"
        );
    }

    #[test]
    fn missing_event_types() {
        for types in [None, Some(json!([])), Some(json!(null))] {
            let err = error_with(|r| {
                match types {
                    Some(t) => r.insert("event_types".into(), t),
                    None => r.remove("event_types"),
                };
            });
            assert_eq!(err.field, "notifications[0].event_types");
            assert!(err.message.starts_with("required"), "{err}");
        }
    }

    #[test]
    fn ids_are_any_text_of_at_most_256_encoded_bytes() {
        for id in ["缩略图,small", "a b", &"x".repeat(256), &"图".repeat(28)] {
            let mut body = example();
            body["notifications"][0]["id"] = json!(id);
            assert_eq!(parse(&body).unwrap()[0].id, id);
        }
        let err = error_with(|r| {
            r.insert("id".into(), json!("图".repeat(29)));
        });
        assert_eq!(err.field, "notifications[0].id");
        assert!(
            err.message
                .starts_with("at most 256 bytes once percent-encoded")
        );
        assert!(err.message.ends_with("got 261"), "{}", err.message);
        let err = error_with(|r| {
            r.insert("id".into(), json!("  "));
        });
        assert_eq!(err.message, "required: a non-empty rule id");
    }

    #[test]
    fn only_patterns_that_run_as_regular_expressions_count_against_the_budget() {
        for cheap in ["a.jpg", "*.jpg", "photos/*", "*thumb.png", ""] {
            assert!(!runs_as_regex(cheap), "{cheap}");
        }
        for costly in [
            "*a?c",
            "*foo*",
            "uploads/*.jpg",
            "[ab].jpg",
            "{a,b}*",
            "a\\*b",
            "?*",
        ] {
            assert!(runs_as_regex(costly), "{costly}");
        }
    }

    #[test]
    fn unknown_cloudfunc_names_the_supported() {
        let err = error_with(|r| {
            r.insert("cloudfunc".into(), json!("tupu-porn"));
        });
        assert_eq!(err.field, "notifications[0].cloudfunc");
        assert_eq!(
            err.message,
            "unknown cloudfunc `tupu-porn`; supported: image, notifier"
        );

        let err = error_with(|r| {
            r.remove("cloudfunc");
        });
        assert_eq!(err.field, "notifications[0].cloudfunc");
        assert_eq!(err.message, "required; supported: image, notifier");
        // A value of megabytes is shown cut, as everywhere.
        for (field, value) in [
            ("cloudfunc", json!("x".repeat(1 << 20))),
            (
                "notify_url",
                json!(format!("ftp://{}", "x".repeat(1 << 20))),
            ),
            ("event_types", json!(["x".repeat(1 << 20)])),
        ] {
            let err = error_with(|r| {
                r.insert(field.into(), value.clone());
            });
            assert!(
                err.message.len() < 300,
                "{field}: {} bytes",
                err.message.len()
            );
            assert!(err.message.contains("(1048"), "{field}: {}", err.message);
        }
    }

    #[test]
    fn missing_or_empty_id() {
        for id in [None, Some(json!("")), Some(json!("  ")), Some(json!(null))] {
            let err = error_with(|r| {
                match id {
                    Some(id) => r.insert("id".into(), id),
                    None => r.remove("id"),
                };
            });
            assert_eq!(err.field, "notifications[0].id");
            assert_eq!(err.message, "required: a non-empty rule id");
        }
    }

    #[test]
    fn duplicate_ids_are_refused() {
        let mut body = example();
        let rule = body["notifications"][0].clone();
        body["notifications"].as_array_mut().unwrap().push(rule);
        let err = parse(&body).unwrap_err();
        assert_eq!(err.field, "notifications[1].id");
        assert!(err.message.starts_with("duplicate id `thumbs`"), "{err}");
    }

    #[test]
    fn bad_glob_names_the_pattern() {
        let err = error_with(|r| {
            r.insert("object_filters".into(), json!(["*.jpg", "a[b"]));
        });
        assert_eq!(err.field, "notifications[0].object_filters[1]");
        assert!(err.message.contains("a[b"), "{err}");
    }

    #[test]
    fn notify_url_must_be_http() {
        for url in [
            "ftp://example.com/x",
            "file:///etc/passwd",
            "example.com/hook",
            "http://",
        ] {
            let err = error_with(|r| {
                r.insert("notify_url".into(), json!(url));
            });
            assert_eq!(err.field, "notifications[0].notify_url", "{url}");
            assert!(err.message.contains(url), "{err}");
        }
        let err = error_with(|r| {
            r.insert("notify_url".into(), json!("ftp://example.com/x"));
        });
        assert!(err.message.contains("only http and https"), "{err}");
    }

    #[test]
    fn notifier_without_notify_url() {
        let err = error_with(|r| {
            r.insert("cloudfunc".into(), json!("notifier"));
            r.remove("notify_url");
        });
        assert_eq!(err.field, "notifications[0].notify_url");
        assert!(err.message.contains("notifier"), "{err}");
    }

    #[test]
    fn wrong_types_name_the_field() {
        let err = error_with(|r| {
            r.insert("event_types".into(), json!(7));
        });
        assert_eq!(err.field, "notifications[0].event_types");
        assert!(
            err.message.contains("a string or a list of strings"),
            "{err}"
        );

        let err = error_with(|r| {
            r.insert("id".into(), json!(["a"]));
        });
        assert_eq!(err.field, "notifications[0].id");

        // Fields inside cloudfunc_args and items of a list are named too.
        for (field, args) in [
            (
                "save_bucket",
                json!({"action": "rotate:a_90", "save_bucket": 5}),
            ),
            ("action", json!({"action": ["rotate:a_90"]})),
            (
                "key_prefix",
                json!({"action": "rotate:a_90", "key_prefix": false}),
            ),
            (
                "key_seprate",
                json!({"action": "rotate:a_90", "key_seprate": {}}),
            ),
        ] {
            let err = error_with(|r| {
                r.insert("cloudfunc_args".into(), args);
            });
            assert_eq!(
                err.field,
                format!("notifications[0].cloudfunc_args.{field}")
            );
            assert!(err.message.contains("expected a string"), "{err}");
        }
        let err = error_with(|r| {
            r.insert("object_filters".into(), json!(["*.jpg", 7]));
        });
        assert_eq!(err.field, "notifications[0].object_filters[1]");
        let err = error_with(|r| {
            r.insert("cloudfunc_args".into(), json!("resize:w_10"));
        });
        assert_eq!(err.field, "notifications[0].cloudfunc_args");
        // Said as the user writes it, not by our type's name.
        assert!(
            err.message
                .contains("expected an object of action, key_prefix"),
            "{err}"
        );
        assert!(!err.message.contains("Raw"), "{err}");

        let err = parse(&json!({"notifications": ["thumbs"]})).unwrap_err();
        assert_eq!(err.field, "notifications[0]");
        assert!(err.message.contains("expected a JSON object"), "{err}");

        let err = parse(&json!({"notifications": {"id": "x"}})).unwrap_err();
        assert_eq!(err.field, "notifications");
    }

    #[test]
    fn malformed_json_names_the_json_problem() {
        let err = parse_notifications(br#"{"notifications": [}"#, "photos").unwrap_err();
        assert_eq!(err.field, "body");
        assert!(err.message.starts_with("invalid JSON: "), "{err}");
        assert!(err.message.contains("line 1 column"), "{err}");

        let err = parse_notifications(b"[]", "photos").unwrap_err();
        assert_eq!(err.field, "body");

        let err = parse_notifications(b"{}", "photos").unwrap_err();
        assert_eq!(err.field, "notifications");
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let mut body = example();
        body["extra"] = json!(true);
        body["notifications"][0]["colour"] = json!("blue");
        body["notifications"][0]["cloudfunc_args"]["quality"] = json!(90);
        assert_eq!(parse(&body).unwrap().len(), 1);
    }

    #[test]
    fn output_that_would_overwrite_the_original_is_refused() {
        let err = error_with(|r| {
            r.insert(
                "cloudfunc_args".into(),
                json!({"action": "rotate:a_90", "key_prefix": "", "key_seprate": ""}),
            );
        });
        assert_eq!(err.field, "notifications[0].cloudfunc_args.key_prefix");

        let err = error_with(|r| {
            r.insert(
                "cloudfunc_args".into(),
                json!({"action": "rotate:a_90", "key_prefix": "", "key_seprate": "",
                       "save_bucket": "photos"}),
            );
        });
        assert_eq!(err.field, "notifications[0].cloudfunc_args.key_prefix");

        // `info` elsewhere than at the end leaves an image to write.
        let err = error_with(|r| {
            r.insert(
                "cloudfunc_args".into(),
                json!({"action": "info|rotate:a_90", "key_prefix": "", "key_seprate": ""}),
            );
        });
        assert_eq!(err.field, "notifications[0].cloudfunc_args.key_prefix");
        // A pipeline that ends with `info` writes no output object.
        let mut body = example();
        body["notifications"][0]["cloudfunc_args"] =
            json!({"action": "rotate:a_90|info", "key_prefix": "", "key_seprate": ""});
        assert_eq!(parse(&body).unwrap().len(), 1);

        let mut body = example();
        body["notifications"][0]["cloudfunc_args"] = json!({"action": "rotate:a_90", "key_prefix": "", "key_seprate": "",
                   "save_bucket": "copies"});
        let rules = parse(&body).unwrap();
        assert_eq!(
            rules[0].image_args().unwrap().output_key("a/b.jpg"),
            "a/b.jpg"
        );
    }

    #[test]
    fn output_keys_the_store_would_refuse_are_refused_when_the_rule_is_set() {
        for (prefix, sep, why) in [
            ("/", "", "must not start with '/'"),
            ("..", "/", "`..` segments are not allowed"),
            ("gen", "//", "empty segments"),
            ("a\\b", "_", "must not contain '\\'"),
            ("gen\u{0}", "_", "must not contain NUL"),
            (".imgfunc-x", "/", "reserved by the local store"),
        ] {
            let err = error_with(|r| {
                r.insert(
                    "cloudfunc_args".into(),
                    json!({"action": "rotate:a_90", "key_prefix": prefix, "key_seprate": sep}),
                );
            });
            assert_eq!(err.field, "notifications[0].cloudfunc_args.key_prefix");
            assert!(err.message.contains(why), "{prefix:?} {sep:?}: {err}");
            assert!(err.message.contains("which are not valid keys"), "{err}");
        }
        let long = "p".repeat(1100);
        let err = error_with(|r| {
            r.insert(
                "cloudfunc_args".into(),
                json!({"action": "rotate:a_90", "key_prefix": long}),
            );
        });
        assert!(err.message.contains("at most 1024 bytes"), "{err}");
        // Folders in the prefix, dots inside a name: fine.
        for (prefix, sep) in [("thumbs/small", "/"), ("..", "_"), ("gen.", "")] {
            let mut body = example();
            body["notifications"][0]["cloudfunc_args"] =
                json!({"action": "rotate:a_90", "key_prefix": prefix, "key_seprate": sep});
            assert!(parse(&body).is_ok(), "{prefix:?} {sep:?}");
        }
        // `save:` keys are held to the same rules.
        for key in ["/abs.jpg", "a/../b.jpg", "dir/"] {
            let action = format!("rotate:a_90|save:b_out,k_{key}");
            let err = error_with(|r| {
                r.insert("cloudfunc_args".into(), json!({"action": action}));
            });
            assert_eq!(err.field, "notifications[0].cloudfunc_args.action", "{key}");
            assert!(err.message.starts_with("save: "), "{key}: {err}");
        }
    }

    #[test]
    fn bad_save_bucket_names_the_field() {
        let err = error_with(|r| {
            r.insert(
                "cloudfunc_args".into(),
                json!({"action": "rotate:a_90", "save_bucket": "../etc"}),
            );
        });
        assert_eq!(err.field, "notifications[0].cloudfunc_args.save_bucket");
    }

    #[test]
    fn inline_rule_fields_start_at_the_rule() {
        let err = Rule::from_json(
            &json!({"id": "x", "event_types": "create_object",
                                          "cloudfunc": "image"}),
            "photos",
        )
        .unwrap_err();
        assert_eq!(err.field, "cloudfunc_args.action");
        let rule = Rule::from_json(&example()["notifications"][0], "photos").unwrap();
        assert_eq!(rule.id, "thumbs");
    }

    #[test]
    fn rule_file_form() {
        let file = json!({"bucket": "photos", "notifications": example()["notifications"]});
        let (bucket, rules) = parse_rule_file(file.to_string().as_bytes()).unwrap();
        assert_eq!(bucket, "photos");
        assert_eq!(rules.len(), 1);

        let err = parse_rule_file(example().to_string().as_bytes()).unwrap_err();
        assert_eq!(err.field, "bucket");
        let err = parse_rule_file(br#"{"bucket": "a/b", "notifications": []}"#).unwrap_err();
        assert_eq!(err.field, "bucket");
        assert!(err.message.contains("invalid bucket name `a/b`"), "{err}");
    }

    #[test]
    fn bucket_names() {
        for ok in [
            "photos",
            "my-bucket.v2",
            "a",
            "Legacy_Bucket",
            &"a".repeat(250),
        ] {
            assert!(validate_bucket_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".hidden",
            "..",
            "a/b",
            "a\\b",
            "-x",
            "水",
            &"a".repeat(251),
        ] {
            assert!(validate_bucket_name(bad).is_err(), "{bad}");
        }
    }
}
