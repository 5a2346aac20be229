//! Notification rules: QingStor's `PUT /?notification` body, validated once
//! when it is set, then matched against events and used to name outputs.
//!
//! [`model`] is the JSON as users write it; [`Rule`] is what it becomes after
//! validation, with the action parsed and the filters compiled, so nothing is
//! re-parsed or found wrong at event time. [`RuleBook`] holds the rules of
//! every bucket and keeps the ones set through the API across restarts.

mod book;
mod error;
mod event_type;
pub mod model;
mod rule;
mod validate;

pub use book::{RuleBook, RuleBookError, WatermarkCheck};
pub use error::RuleError;
pub use event_type::{EventType, UnknownEventType};
pub use rule::{
    CloudFunc, DEFAULT_KEY_PREFIX, DEFAULT_KEY_SEPRATE, ImageArgs, ObjectFilters, Rule,
    id_in_metadata,
};
pub(crate) use validate::kind as json_kind;
pub use validate::{
    check_save_targets, parse_notifications, parse_rule_file, validate_bucket_name,
};
