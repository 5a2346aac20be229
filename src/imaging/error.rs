use thiserror::Error;

/// Why an image could not be processed. Each variant names what was wrong.
#[derive(Debug, Error)]
pub enum ImagingError {
    /// `size` is `None` when the input announced a size within the limit
    /// (or none) and reading it found more.
    #[error("input is {}, over the limit of {limit} bytes", shown_size(*size))]
    InputTooLarge { size: Option<usize>, limit: usize },
    #[error(
        "image is {width}x{height} ({pixels} pixels), over the limit of {limit} pixels; refused before decoding"
    )]
    TooManyPixels {
        width: u32,
        height: u32,
        pixels: u64,
        limit: u64,
    },
    #[error(
        "image is {width}x{height}, a side over the limit of {limit} pixels; refused before decoding"
    )]
    SideTooLong { width: u32, height: u32, limit: u32 },
    #[error("{op}: output would be {width}x{height}, over the limit of {limit}")]
    OutputTooLarge {
        op: &'static str,
        width: u64,
        height: u64,
        /// The limit with its unit: "16384 px per side", "100000000 pixels".
        limit: String,
    },
    #[error("animation has {frames} frames of {width}x{height}, over the limit of {limit}")]
    AnimationTooLarge {
        frames: usize,
        width: u32,
        height: u32,
        limit: String,
    },
    #[error("input is not an image in a supported format (jpeg, png, webp, tiff, gif, bmp)")]
    UnknownFormat,
    #[error("cannot decode {format} image: {message}")]
    Decode {
        format: &'static str,
        message: String,
    },
    #[error("cannot encode {format}: {message}")]
    Encode {
        format: &'static str,
        message: String,
    },
    #[error("watermark_image: cannot read watermark {url}: {message}")]
    Watermark { url: String, message: String },
    #[error("{op}: {message}")]
    Operation { op: &'static str, message: String },
}

/// An input's size as an error gives it.
fn shown_size(size: Option<usize>) -> String {
    size.map_or_else(
        || "longer than the size it announced".to_string(),
        |size| format!("{size} bytes"),
    )
}

impl ImagingError {
    /// The error with its output's sides swapped: that of a resize the
    /// pipeline moved before a quarter turn, told in the sides asked for.
    pub(super) fn turned(self) -> ImagingError {
        match self {
            ImagingError::OutputTooLarge {
                op,
                width,
                height,
                limit,
            } => ImagingError::OutputTooLarge {
                op,
                width: height,
                height: width,
                limit,
            },
            ImagingError::AnimationTooLarge {
                frames,
                width,
                height,
                limit,
            } => ImagingError::AnimationTooLarge {
                frames,
                width: height,
                height: width,
                limit,
            },
            other => other,
        }
    }

    /// An input of `size` bytes refused for being over `limits`' input
    /// limit; a `size` within the limit is the size it announced, before
    /// reading it found more.
    pub fn input_too_large(size: u64, limits: &super::Limits) -> ImagingError {
        let limit = limits.max_input_bytes;
        ImagingError::InputTooLarge {
            size: (size > limit as u64).then(|| usize::try_from(size).unwrap_or(usize::MAX)),
            limit,
        }
    }

    /// A stable, machine-readable code for results and HTTP errors.
    pub fn code(&self) -> &'static str {
        match self {
            ImagingError::InputTooLarge { .. } => "input_too_large",
            ImagingError::TooManyPixels { .. } | ImagingError::SideTooLong { .. } => {
                "too_many_pixels"
            }
            ImagingError::OutputTooLarge { .. } => "output_too_large",
            ImagingError::AnimationTooLarge { .. } => "animation_too_large",
            ImagingError::UnknownFormat => "not_an_image",
            ImagingError::Decode { .. } => "decode_failed",
            ImagingError::Encode { .. } => "encode_failed",
            ImagingError::Watermark { .. } => "watermark_unavailable",
            ImagingError::Operation { .. } => "operation_failed",
        }
    }

    /// True when the input (not the service) is at fault because it exceeds a limit.
    pub fn is_limit(&self) -> bool {
        matches!(
            self,
            ImagingError::InputTooLarge { .. }
                | ImagingError::TooManyPixels { .. }
                | ImagingError::SideTooLong { .. }
                | ImagingError::OutputTooLarge { .. }
                | ImagingError::AnimationTooLarge { .. }
        )
    }
}
