use thiserror::Error;

/// Why a rule set was refused: the field at fault, as a path into the JSON
/// body (`notifications[0].cloudfunc_args.action`), and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{field}: {message}")]
pub struct RuleError {
    /// Path of the offending field; `body` when the JSON itself is malformed.
    pub field: String,
    /// What is wrong and, where it helps, what is allowed.
    pub message: String,
}

impl RuleError {
    /// An error about `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> RuleError {
        RuleError {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The same error seen from an enclosing value: `action` under
    /// `notifications[2].cloudfunc_args` becomes
    /// `notifications[2].cloudfunc_args.action`.
    pub fn under(mut self, prefix: &str) -> RuleError {
        self.field = join_field(prefix, &self.field);
        self
    }

    /// The same message about another field.
    pub fn renamed(mut self, field: impl Into<String>) -> RuleError {
        self.field = field.into();
        self
    }
}

/// Joins two field paths, without a dot before an index or around an empty side.
pub(crate) fn join_field(prefix: &str, field: &str) -> String {
    if prefix.is_empty() {
        field.to_string()
    } else if field.is_empty() {
        prefix.to_string()
    } else if field.starts_with('[') {
        format!("{prefix}{field}")
    } else {
        format!("{prefix}.{field}")
    }
}
