use thiserror::Error;

/// Why an action string was refused. Every message names the operation and,
/// where there is one, the key, the value given and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ActionError {
    #[error("action is empty: expected operation:k_v[,k_v]...[|operation...]")]
    Empty,
    #[error("empty operation at position {position}: a leading or trailing `|`, or two in a row")]
    EmptyOperation { position: usize },
    #[error("unknown operation `{op}`; allowed: {allowed}")]
    UnknownOperation { op: String, allowed: &'static str },
    #[error("{op}: unknown key `{key}`; allowed: {allowed}")]
    UnknownKey {
        op: &'static str,
        key: String,
        allowed: &'static str,
    },
    #[error("{op}: parameter `{param}` is not of the form key_value")]
    MalformedParam { op: &'static str, param: String },
    #[error("{op}: key `{key}` is given twice")]
    DuplicateKey { op: &'static str, key: String },
    #[error("{op}: missing required key `{key}` ({allowed})")]
    MissingKey {
        op: &'static str,
        key: &'static str,
        allowed: &'static str,
    },
    #[error("{op}: {key} must be {allowed}, got {value}")]
    InvalidValue {
        op: &'static str,
        key: &'static str,
        value: String,
        allowed: String,
    },
    #[error("too many operations: at most {max}{what} per action, got {count}")]
    TooMany {
        what: &'static str,
        max: usize,
        count: usize,
    },
    #[error("{op}: {message}")]
    Conflict { op: &'static str, message: String },
}
