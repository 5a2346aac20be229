use super::{DEFAULT_CONTENT_TYPE, PutOptions, StoreError};
use std::collections::BTreeMap;

/// The longest key S3 accepts, in bytes of UTF-8.
const MAX_KEY_BYTES: usize = 1024;

/// The longest file name common file systems accept, in bytes.
const MAX_SEGMENT_BYTES: usize = 255;

/// The most user metadata S3 accepts: names plus values, in bytes.
pub const MAX_USER_METADATA_BYTES: usize = 2048;

/// File names starting with this are the local store's own (temporary files),
/// so no key segment may start with it.
pub(crate) const RESERVED_SEGMENT_PREFIX: &str = ".imgfunc-";

/// Checks the rules every store shares: a key is 1 to 1024 bytes and holds no
/// NUL.
pub fn validate_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() {
        return Err(StoreError::invalid_key(key, "a key must not be empty"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(StoreError::invalid_key(
            key,
            format!("a key is at most {MAX_KEY_BYTES} bytes, got {}", key.len()),
        ));
    }
    if key.contains('\0') {
        return Err(StoreError::invalid_key(key, "a key must not contain NUL"));
    }
    Ok(())
}

/// Checks a bucket name: 1 to 63 characters of `a-z`, `0-9`, `.`, `_` and
/// `-`, not starting with `.` or `-`, which keeps it a safe folder name.
pub fn validate_bucket(bucket: &str) -> Result<(), StoreError> {
    let invalid = |reason: String| StoreError::InvalidBucket {
        bucket: crate::shown(bucket),
        reason,
    };
    if let Some(c) = bucket
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '_' | '-'))
    {
        return Err(invalid(format!(
            "{c:?} is not allowed; use a-z, 0-9, '.', '_' and '-'"
        )));
    }
    if bucket.is_empty() || bucket.len() > 63 {
        return Err(invalid(format!(
            "a bucket name is 1 to 63 characters, got {}",
            bucket.len()
        )));
    }
    if bucket.starts_with(['.', '-']) {
        return Err(invalid(
            "a bucket name must not start with '.' or '-'".into(),
        ));
    }
    Ok(())
}

/// The local store's rules on top of [`validate_key`]: the key must be a
/// relative path of plain segments that stays inside its bucket folder.
pub fn validate_local_key(key: &str) -> Result<(), StoreError> {
    validate_key(key)?;
    if key.starts_with('/') {
        return Err(StoreError::invalid_key(
            key,
            "a key must not start with '/' (absolute paths are not allowed)",
        ));
    }
    if key.contains('\\') {
        return Err(StoreError::invalid_key(
            key,
            "a key must not contain '\\' in the local store",
        ));
    }
    for segment in key.split('/') {
        let reason = match segment {
            "" => "a key must not have empty segments ('//' or a trailing '/') in the local store"
                .to_owned(),
            "." | ".." => format!("`{segment}` segments are not allowed"),
            s if s.starts_with(RESERVED_SEGMENT_PREFIX) => format!(
                "segments starting with {RESERVED_SEGMENT_PREFIX:?} are reserved by the local store"
            ),
            s if s.len() > MAX_SEGMENT_BYTES => format!(
                "each '/'-separated segment is at most {MAX_SEGMENT_BYTES} bytes in the local store, got {}",
                s.len()
            ),
            _ => continue,
        };
        return Err(StoreError::invalid_key(key, reason));
    }
    Ok(())
}

/// Validates put options and brings them to the form both stores keep:
/// metadata names in lowercase, an empty content type replaced by the
/// default.
pub(crate) fn normalize_put_options(opts: PutOptions) -> Result<PutOptions, StoreError> {
    let content_type = if opts.content_type.is_empty() {
        DEFAULT_CONTENT_TYPE.to_owned()
    } else {
        check_header_value("content-type", &opts.content_type)?;
        opts.content_type
    };
    let mut user_metadata = BTreeMap::new();
    let mut total = 0;
    for (name, value) in opts.user_metadata {
        check_metadata_name(&name)?;
        check_header_value(&name, &value)?;
        total += name.len() + value.len();
        let lower = name.to_ascii_lowercase();
        if user_metadata.insert(lower, value).is_some() {
            return Err(StoreError::InvalidMetadata {
                name,
                reason: "given twice (names are case-insensitive)".into(),
            });
        }
    }
    if total > MAX_USER_METADATA_BYTES {
        return Err(StoreError::InvalidMetadata {
            name: "user metadata".into(),
            reason: format!(
                "names and values are at most {MAX_USER_METADATA_BYTES} bytes together, got {total}"
            ),
        });
    }
    Ok(PutOptions {
        content_type,
        user_metadata,
    })
}

fn check_metadata_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidMetadata {
            name: name.to_owned(),
            reason: "a name is one or more ASCII letters, digits, '-', '_' or '.'".into(),
        })
    }
}

fn check_header_value(name: &str, value: &str) -> Result<(), StoreError> {
    let printable = value.bytes().all(|b| (0x20..0x7f).contains(&b));
    let reason = if !printable {
        "a value must be printable ASCII (no control or non-ASCII characters)"
    } else if value.starts_with(' ') || value.ends_with(' ') {
        "a value must not start or end with a space (HTTP would strip it)"
    } else {
        return Ok(());
    };
    Err(StoreError::InvalidMetadata {
        name: name.to_owned(),
        reason: reason.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_key_rules() {
        assert!(validate_key("a").is_ok());
        assert!(validate_key("photos/2024/a b.jpg").is_ok());
        assert!(
            validate_key("../x").is_ok(),
            "only the local store refuses .."
        );
        assert!(validate_key(&"k".repeat(1024)).is_ok());
        for bad in ["", "a\0b"] {
            assert_eq!(validate_key(bad).unwrap_err().code(), "invalid_key");
        }
        let err = validate_key(&"k".repeat(1025)).unwrap_err();
        assert!(
            err.to_string().contains("at most 1024 bytes, got 1025"),
            "{err}"
        );
    }

    #[test]
    fn local_key_rules() {
        for good in ["a", "a/b/c.jpg", "a..b", ".hidden", "x/.y", "a b/ü.png"] {
            assert!(validate_local_key(good).is_ok(), "{good}");
        }
        for (bad, why) in [
            ("../x", "`..`"),
            ("/etc/passwd", "absolute"),
            ("a/../../b", "`..`"),
            ("a\0b", "NUL"),
            ("a//b", "empty segments"),
            ("a/", "empty segments"),
            ("./a", "`.`"),
            ("a\\b", "'\\'"),
            (".imgfunc-tmp-1", "reserved"),
        ] {
            let err = validate_local_key(bad).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(why), "{bad:?}: {msg}");
            assert!(msg.contains(&format!("{bad:?}")), "{bad:?}: {msg}");
        }
        assert!(validate_local_key(&"s".repeat(256)).is_err());
    }

    #[test]
    fn bucket_rules() {
        for good in ["a", "photos", "my-bucket.v2", "b_1", &"b".repeat(63)] {
            assert!(validate_bucket(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".imgfunc-meta",
            "-a",
            "Photos",
            "a/b",
            "..",
            "a b",
            &"b".repeat(64),
        ] {
            let err = validate_bucket(bad).unwrap_err();
            assert_eq!(err.code(), "invalid_bucket", "{bad}");
        }
        let err = validate_bucket("a/b").unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"invalid bucket name "a/b": '/' is not allowed; use a-z, 0-9, '.', '_' and '-'"#
        );
    }

    #[test]
    fn a_name_of_a_megabyte_is_shown_by_its_start_and_length() {
        let long = "a".repeat(1 << 20);
        for err in [
            validate_key(&long).unwrap_err(),
            validate_bucket(&long).unwrap_err(),
        ] {
            let msg = err.to_string();
            assert!(msg.len() < 300, "{} bytes: {}", msg.len(), &msg[..300]);
            assert!(
                msg.contains(&format!("{}… (1048576 bytes)", "a".repeat(64))),
                "{msg}"
            );
        }
    }

    #[test]
    fn put_options_are_normalized() {
        let mut opts = PutOptions::with_content_type("");
        opts.user_metadata.insert("Rule-ID".into(), "thumbs".into());
        let opts = normalize_put_options(opts).unwrap();
        assert_eq!(opts.content_type, DEFAULT_CONTENT_TYPE);
        assert_eq!(opts.user_metadata["rule-id"], "thumbs");
    }

    #[test]
    fn bad_metadata_is_refused() {
        let cases = [
            ("", "v"),
            ("a b", "v"),
            ("name", "line\nbreak"),
            ("name", "水印"),
            ("name", " padded"),
        ];
        for (name, value) in cases {
            let mut opts = PutOptions::default();
            opts.user_metadata.insert(name.into(), value.into());
            let err = normalize_put_options(opts).unwrap_err();
            assert_eq!(err.code(), "invalid_metadata", "{name:?}={value:?}");
        }

        let mut opts = PutOptions::default();
        opts.user_metadata.insert("A".into(), "1".into());
        opts.user_metadata.insert("a".into(), "2".into());
        assert!(normalize_put_options(opts).is_err());

        let mut opts = PutOptions::default();
        opts.user_metadata.insert("big".into(), "x".repeat(2046));
        assert!(normalize_put_options(opts).is_err());

        let opts = PutOptions::with_content_type("image/jpeg\r\nx: y");
        assert!(normalize_put_options(opts).is_err());
    }
}
