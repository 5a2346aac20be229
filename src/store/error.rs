use std::path::{Path, PathBuf};
use thiserror::Error;

/// Why a store operation failed. Every message names the bucket, key, path or
/// endpoint involved and what was wrong with it.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("object {key:?} not found in bucket {bucket:?}")]
    NotFound { bucket: String, key: String },

    #[error("bucket {bucket:?} does not exist")]
    NoSuchBucket { bucket: String },

    #[error("invalid object key {key:?}: {reason}")]
    InvalidKey { key: String, reason: String },

    #[error("invalid bucket name {bucket:?}: {reason}")]
    InvalidBucket { bucket: String, reason: String },

    /// A user metadata name or value, or the content type, that cannot be
    /// stored (S3 sends them as HTTP headers).
    #[error("invalid metadata {name:?}: {reason}")]
    InvalidMetadata { name: String, reason: String },

    /// A local file system operation failed.
    #[error("local store: cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The remote store refused or could not be reached. `target` names what
    /// was asked for (`bucket/key`, a bucket and prefix, or the endpoint).
    #[error("s3 {op} {target}: {message}")]
    Backend {
        op: &'static str,
        target: String,
        message: String,
        /// Worth trying again later: the server could not be reached, did
        /// not answer in time, broke off, or failed (5xx, 408, 429), as
        /// opposed to refusing (403, 400).
        transient: bool,
    },
}

impl StoreError {
    /// A stable, machine-readable code for this kind of error, for JSON
    /// results and logs.
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::NotFound { .. } => "not_found",
            StoreError::NoSuchBucket { .. } => "no_such_bucket",
            StoreError::InvalidKey { .. } => "invalid_key",
            StoreError::InvalidBucket { .. } => "invalid_bucket",
            StoreError::InvalidMetadata { .. } => "invalid_metadata",
            StoreError::Io { .. } => "io",
            StoreError::Backend { .. } => "backend",
        }
    }

    /// True for a failure that may pass (see [`StoreError::Backend`]).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Backend {
                transient: true,
                ..
            }
        )
    }

    /// True when the object is not there: the key or its whole bucket is
    /// missing.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            StoreError::NotFound { .. } | StoreError::NoSuchBucket { .. }
        )
    }

    pub(crate) fn not_found(bucket: &str, key: &str) -> Self {
        StoreError::NotFound {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
        }
    }

    pub(crate) fn no_such_bucket(bucket: &str) -> Self {
        StoreError::NoSuchBucket {
            bucket: bucket.to_owned(),
        }
    }

    pub(crate) fn invalid_key(key: &str, reason: impl Into<String>) -> Self {
        StoreError::InvalidKey {
            key: crate::shown(key),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StoreError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// The error with its file named from the local store's `root`
    /// (`photos/a.jpg`), as clients and results see it: where the store
    /// lives on the server is not theirs to know.
    pub(crate) fn under_root(self, root: &Path) -> Self {
        match self {
            StoreError::Io { op, path, source } => StoreError::Io {
                op,
                path: match path.strip_prefix(root) {
                    Ok(inside) if inside.as_os_str().is_empty() => {
                        PathBuf::from("the store's root")
                    }
                    Ok(inside) => inside.to_path_buf(),
                    Err(_) => path,
                },
                source,
            },
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_paths_are_told_from_the_stores_root() {
        let root = Path::new("/srv/imgfunc/data");
        let told = |path: &str| {
            let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
            StoreError::io("write", path, denied)
                .under_root(root)
                .to_string()
        };
        assert_eq!(
            told("/srv/imgfunc/data/photos/a.jpg"),
            "local store: cannot write photos/a.jpg: permission denied"
        );
        assert!(told("/srv/imgfunc/data").contains("cannot write the store's root:"));
        // Nothing under the root: told as it is.
        assert!(told("/elsewhere/x").contains("/elsewhere/x"));
        let other = StoreError::not_found("photos", "a.jpg").under_root(root);
        assert!(matches!(other, StoreError::NotFound { .. }));
    }

    #[test]
    fn messages_name_bucket_and_key() {
        let err = StoreError::not_found("photos", "a/b.jpg");
        assert_eq!(
            err.to_string(),
            r#"object "a/b.jpg" not found in bucket "photos""#
        );
        assert_eq!(err.code(), "not_found");
        assert!(err.is_not_found());

        let err = StoreError::no_such_bucket("photos");
        assert_eq!(err.to_string(), r#"bucket "photos" does not exist"#);
        assert!(err.is_not_found());

        let err = StoreError::invalid_key("../x", "`..` segments are not allowed");
        assert_eq!(
            err.to_string(),
            r#"invalid object key "../x": `..` segments are not allowed"#
        );
        assert!(!err.is_not_found());
        assert_eq!(err.code(), "invalid_key");
    }
}
