//! imgfunc: a serverless-style image function runtime.
//!
//! A bucket event arrives, a notification rule names a cloudfunc, the `image`
//! cloudfunc runs the rule's action pipeline on the object and writes the
//! result back to object storage, then the outcome is POSTed to `notify_url`.
//! `action` and `imaging` are pure and synchronous; I/O lives in `store`,
//! `notify`, `cloudfunc` and `host`.

pub mod action;
pub mod cloudfunc;
pub mod events;
pub mod host;
pub mod imaging;
pub mod notify;
pub mod rules;
pub mod store;

/// Text from a request as an error shows it: its first 64 characters, so
/// that a value of megabytes (a rule body may be 2 MiB) does not travel in
/// every error message and result.
pub(crate) fn shown(text: &str) -> String {
    shown_up_to(text, 64)
}

/// `text`'s first `chars` characters, saying how long it was when cut.
pub(crate) fn shown_up_to(text: &str, chars: usize) -> String {
    match text.char_indices().nth(chars) {
        Some((end, _)) => format!("{}… ({} bytes)", &text[..end], text.len()),
        None => text.to_string(),
    }
}
