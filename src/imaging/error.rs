use thiserror::Error;

/// Why an image could not be processed. Each variant names what was wrong.
#[derive(Debug, Error)]
pub enum ImagingError {
    #[error("input is {size} bytes, over the limit of {limit} bytes")]
    InputTooLarge { size: usize, limit: usize },
    #[error(
        "image is {width}x{height} ({pixels} pixels), over the limit of {limit} pixels; refused before decoding"
    )]
    TooManyPixels {
        width: u32,
        height: u32,
        pixels: u64,
        limit: u64,
    },
    #[error("{op}: output would be {width}x{height}, over the limit of {limit}")]
    OutputTooLarge {
        op: &'static str,
        width: u32,
        height: u32,
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

impl ImagingError {
    /// An input of `size` bytes refused for being over `limits`' input limit.
    pub fn input_too_large(size: u64, limits: &super::Limits) -> ImagingError {
        ImagingError::InputTooLarge {
            size: usize::try_from(size).unwrap_or(usize::MAX),
            limit: limits.max_input_bytes,
        }
    }

    /// A stable, machine-readable code for results and HTTP errors.
    pub fn code(&self) -> &'static str {
        match self {
            ImagingError::InputTooLarge { .. } => "input_too_large",
            ImagingError::TooManyPixels { .. } => "too_many_pixels",
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
                | ImagingError::OutputTooLarge { .. }
                | ImagingError::AnimationTooLarge { .. }
        )
    }
}
