//! Runs a parsed action pipeline on image bytes: decode (with limits and EXIF
//! orientation), operations, encode, info. CPU only, synchronous, no I/O:
//! the one thing it needs from outside, a watermark image's bytes, comes
//! through [`WatermarkResolver`].

mod colour;
mod decode;
mod encode;
mod error;
mod geometry;
mod info;
mod jpeg;
mod jpeg_dc;
mod jpeg_progressive;
mod jpeg_refine;
pub mod smartcrop;
pub mod watermark;
mod webp_anim;

pub use decode::{Decoded, Lead, LeadFrame, Pixels, SourceMeta, decode, probe};
pub use encode::encode;
pub use error::ImagingError;
pub use geometry::{crop_rect, resize_fails_for_every_source, scaled_size};

use image::codecs::gif::Repeat;
use image::{DynamicImage, Frame};
use serde_json::Value;

use crate::action::{Action, Op};

/// Resource limits, checked before work is done.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest input accepted, in bytes.
    pub max_input_bytes: usize,
    /// Largest image accepted, in pixels, read from the header before decoding.
    pub max_pixels: u64,
    /// Largest width or height an operation may produce.
    pub max_output_side: u32,
    /// Most frames an animated GIF may have.
    pub max_frames: usize,
    /// Most frames x pixels per frame an animation may carry.
    pub max_animation_pixels: u64,
}

/// Why a text watermark is refused when none of its characters is drawn.
pub const NO_MARK: &str =
    "the text has no character the font draws (only spaces, or characters it lacks)";

/// The largest watermark image decoded, in pixels (4096x4096): it is
/// decoded for every invocation that lays it on, as RGBA.
pub const MAX_WATERMARK_PIXELS: u64 = 1 << 24;

/// How many times the pixel limit the operations of one action may make
/// in all.
const PIPELINE_FACTOR: u64 = 4;

impl Limits {
    /// The most pixels the operations of one action may make in all (the
    /// whole result of each crop, rotate, resize and save, every frame):
    /// each operation is held to
    /// the output limits, but 31 resizes of a 1x1 image to 10000x10000 and
    /// back took 12 s, and four saves of such a TIFF 2 GB.
    pub fn pipeline_pixels(&self) -> u64 {
        self.max_pixels
            .max(self.max_animation_pixels)
            .saturating_mul(PIPELINE_FACTOR)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_input_bytes: 50 * 1024 * 1024,
            max_pixels: 100_000_000,
            max_output_side: 16384,
            max_frames: 300,
            max_animation_pixels: 100_000_000,
        }
    }
}

/// Image formats read and written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Jpeg,
    Png,
    Webp,
    Tiff,
    Gif,
    Bmp,
}

impl ImageFormat {
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Jpeg => "jpeg",
            ImageFormat::Png => "png",
            ImageFormat::Webp => "webp",
            ImageFormat::Tiff => "tiff",
            ImageFormat::Gif => "gif",
            ImageFormat::Bmp => "bmp",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            ImageFormat::Jpeg => "image/jpeg",
            ImageFormat::Png => "image/png",
            ImageFormat::Webp => "image/webp",
            ImageFormat::Tiff => "image/tiff",
            ImageFormat::Gif => "image/gif",
            ImageFormat::Bmp => "image/bmp",
        }
    }

    /// True when the format stores an alpha channel.
    pub fn keeps_alpha(self) -> bool {
        !matches!(self, ImageFormat::Jpeg | ImageFormat::Bmp)
    }

    pub fn from_kind(kind: crate::action::FormatKind) -> ImageFormat {
        use crate::action::FormatKind;
        match kind {
            FormatKind::Jpeg => ImageFormat::Jpeg,
            FormatKind::Png => ImageFormat::Png,
            FormatKind::Webp => ImageFormat::Webp,
            FormatKind::Tiff => ImageFormat::Tiff,
        }
    }
}

/// Gives `watermark_image` the bytes behind a URL. The caller decides what a
/// URL may name (local files, store objects, allow-listed hosts).
pub trait WatermarkResolver {
    fn resolve(&self, url: &str) -> Result<Vec<u8>, String>;
}

/// A resolver that refuses every URL, for pipelines without `watermark_image`.
pub struct NoWatermarks;

impl WatermarkResolver for NoWatermarks {
    fn resolve(&self, url: &str) -> Result<Vec<u8>, String> {
        Err(format!("no watermark source is configured for {url}"))
    }
}

/// An encoded image.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub bytes: Vec<u8>,
    pub format: ImageFormat,
    pub width: u32,
    pub height: u32,
}

/// A `save:` output for the caller to store.
#[derive(Debug, Clone)]
pub struct SaveOutput {
    pub bucket: String,
    pub key: String,
    pub image: Encoded,
}

/// What a pipeline produced.
#[derive(Debug, Clone)]
pub struct Output {
    /// The processed image; `None` when the pipeline ends with `info`.
    pub image: Option<Encoded>,
    /// The last `info` the pipeline asked for.
    pub info: Option<Value>,
    pub saves: Vec<SaveOutput>,
}

/// Processing state threaded through the operations.
struct State {
    pixels: Pixels,
    format: ImageFormat,
    quality: Option<u8>,
    repeat: Repeat,
    /// The source is greyscale: written back as grey while it stays so.
    grey: bool,
}

/// Reads a source image of `size` bytes from `body` for `action`: all of it
/// (at most `limits.max_input_bytes` + 1, so that decoding reports a source
/// that grew past the limit), or, for a progressive JPEG that the action
/// shrinks to 1/8, only its segments and DC scans, which decode the same at
/// that scale: a few hundred kilobytes of a file of several megabytes are
/// kept, and reading stops once the DC coefficients are precise enough
/// (within half a grey level, as the decoder itself stops), or with an
/// error once the source is found to be over the input limit.
pub fn read_source(
    body: &mut dyn std::io::Read,
    size: u64,
    action: &Action,
    limits: &Limits,
) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    const HEAD: u64 = 64 << 10;
    let max = (limits.max_input_bytes as u64).saturating_add(1);
    let mut input = Vec::with_capacity(HEAD as usize);
    (&mut *body).take(HEAD.min(max)).read_to_end(&mut input)?;
    let action = geometry::resize_before_rotate(action);
    let (_, lead) = geometry::lead(&action);
    // `info` describes the source file itself, so it needs every byte.
    let describes_source = action.ops.iter().any(|op| matches!(op, Op::Info));
    if input.len() as u64 == HEAD
        && !describes_source
        && decode::eighth_scale_suffices(&input, lead)
    {
        // Held to the limit too: a stream's announced size (none, for an S3
        // object sent without a length) is not trusted.
        let mut rest = (&mut *body).take(max - HEAD);
        let kept = jpeg_dc::read_dc_scans(input, &mut rest, jpeg_dc::Precision::HALF_LEVEL)?;
        if rest.limit() == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::FileTooLarge,
                format!(
                    "the source is over the input limit of {} bytes",
                    limits.max_input_bytes
                ),
            ));
        }
        return Ok(kept);
    }
    let have = input.len() as u64;
    input.reserve(size.min(max).saturating_sub(have) as usize);
    body.take(max.saturating_sub(have))
        .read_to_end(&mut input)?;
    Ok(input)
}

/// Decodes `input`, runs `action` on it and encodes the result.
pub fn process(
    input: &[u8],
    action: &Action,
    limits: &Limits,
    resolver: &dyn WatermarkResolver,
) -> Result<Output, ImagingError> {
    let (action, turned) = geometry::reordered(action);
    let action = &*action;
    // A moved resize's error in the sides the user asked for.
    let as_asked = |index: usize, e: ImagingError| match turned.get(index) {
        Some(true) => e.turned(),
        _ => e,
    };
    let (lead_index, lead) = geometry::lead(action);
    let decoded = decode(input, limits, lead)?;
    let skip = decoded.lead_applied.then_some(lead_index);
    let mut state = State {
        format: decoded.format,
        quality: None,
        repeat: decoded.meta.repeat,
        grey: decoded.meta.space == "b-w",
        pixels: decoded.pixels,
    };
    let mut info = None;
    let mut saves = Vec::new();
    // Pixels the operations have made, each one's whole result, frames
    // included: see [`Limits::pipeline_pixels`].
    let mut made: u64 = 0;
    for (index, op) in action.ops.iter().enumerate() {
        let dims_before = state.pixels.dimensions();
        if Some(index) == skip {
            continue;
        }
        match op {
            Op::Info => {
                info = Some(info::describe(
                    input,
                    &decoded.meta,
                    &state.pixels,
                    state.format,
                ))
            }
            Op::Format(f) => {
                state.format = ImageFormat::from_kind(f.kind);
                state.quality = f.quality;
            }
            Op::Save(s) => saves.push(SaveOutput {
                bucket: s.bucket.clone(),
                key: s.key.clone(),
                image: encode(
                    &state.pixels,
                    state.format,
                    state.quality,
                    state.repeat,
                    state.grey,
                )?,
            }),
            Op::WatermarkImage(w) => {
                let bytes =
                    resolver
                        .resolve(&w.url)
                        .map_err(|message| ImagingError::Watermark {
                            url: w.url.clone(),
                            message,
                        })?;
                // In RGBA once, not for every frame it is laid on; a logo
                // is held to a logo's size, whatever the input limit.
                let overlay_limits = Limits {
                    max_pixels: limits.max_pixels.min(MAX_WATERMARK_PIXELS),
                    ..limits.clone()
                };
                let overlay = decode::decode_first_frame(&bytes, &overlay_limits)
                    .map_err(|e| ImagingError::Watermark {
                        url: w.url.clone(),
                        message: e.to_string(),
                    })?
                    .into_rgba8();
                let overlay = DynamicImage::ImageRgba8(overlay);
                let opacity = w.opacity.get();
                state.pixels.for_each_frame(|img| {
                    watermark::composite(img, &overlay, w.left, w.top, opacity);
                    Ok(())
                })?;
            }
            Op::Watermark(w) => {
                // An image said to be marked is marked, or the action fails.
                if !watermark::draws_something(&w.text) {
                    return Err(ImagingError::Operation {
                        op: "watermark",
                        message: NO_MARK.into(),
                    });
                }
                // Laid out and rendered once for all the frames of an
                // animation, which share one size.
                let mut stamp: Option<((u32, u32), Option<watermark::TextStamp>)> = None;
                state.pixels.for_each_frame(|img| {
                    let size = (img.width(), img.height());
                    if stamp.as_ref().is_none_or(|(made_for, _)| *made_for != size) {
                        stamp = Some((size, watermark::TextStamp::new(w, size.0, size.1)));
                    }
                    if let Some((_, Some(stamp))) = &stamp {
                        stamp.draw(img);
                    }
                    Ok(())
                })?
            }
            Op::Resize(r) if index == lead_index && decoded.lead_frame.is_some() => {
                geometry::resize_pixels(&mut state.pixels, r, decoded.lead_frame.as_ref(), limits)
                    .map_err(|e| as_asked(index, e))?
            }
            Op::Crop(_) | Op::Rotate(_) | Op::Resize(_) => {
                geometry::apply(&mut state.pixels, op, limits).map_err(|e| as_asked(index, e))?
            }
        }
        // The operations that make a new image (a watermark draws on the
        // one there is; a crop of the whole image and `rotate:a_0` keep it).
        let kept = match op {
            Op::Crop(_) => state.pixels.dimensions() == dims_before,
            Op::Rotate(r) => *r == crate::action::Rotation::R0,
            _ => false,
        };
        if !kept
            && matches!(
                op,
                Op::Crop(_) | Op::Rotate(_) | Op::Resize(_) | Op::Save(_)
            )
        {
            made = made.saturating_add(state.pixels.all_pixels());
            let budget = limits.pipeline_pixels();
            if made > budget {
                let (width, height) = state.pixels.dimensions();
                return Err(ImagingError::OutputTooLarge {
                    op: op.name(),
                    width: width.into(),
                    height: height.into(),
                    limit: format!("{budget} pixels made by the whole action ({made} so far)"),
                });
            }
        }
    }
    let image = if action.ends_with_info() {
        None
    } else {
        Some(encode(
            &state.pixels,
            state.format,
            state.quality,
            state.repeat,
            state.grey,
        )?)
    };
    Ok(Output { image, info, saves })
}

impl Pixels {
    /// Pixels in all its frames.
    pub fn all_pixels(&self) -> u64 {
        let (w, h) = self.dimensions();
        let frames = match self {
            Pixels::Still(_) => 1,
            Pixels::Animated(frames) => frames.len() as u64,
        };
        u64::from(w) * u64::from(h) * frames
    }

    /// Width and height of the (first) frame.
    pub fn dimensions(&self) -> (u32, u32) {
        match self {
            Pixels::Still(img) => (img.width(), img.height()),
            Pixels::Animated(frames) => frames
                .first()
                .map(|f| f.buffer().dimensions())
                .unwrap_or((0, 0)),
        }
    }

    pub fn has_alpha(&self) -> bool {
        match self {
            Pixels::Still(img) => img.color().has_alpha(),
            Pixels::Animated(frames) => frames
                .iter()
                .any(|f| f.buffer().pixels().any(|p| p[3] < u8::MAX)),
        }
    }

    /// The still image, or the first frame of an animation.
    pub fn into_first_frame(self) -> DynamicImage {
        match self {
            Pixels::Still(img) => img,
            Pixels::Animated(frames) => frames
                .into_iter()
                .next()
                .map(|f| DynamicImage::ImageRgba8(f.into_buffer()))
                .unwrap_or_else(|| DynamicImage::new_rgb8(1, 1)),
        }
    }

    /// Applies `f` to the still image or to every frame of an animation.
    pub(crate) fn for_each_frame(
        &mut self,
        mut f: impl FnMut(&mut DynamicImage) -> Result<(), ImagingError>,
    ) -> Result<(), ImagingError> {
        match self {
            Pixels::Still(img) => f(img),
            Pixels::Animated(frames) => {
                for frame in frames.iter_mut() {
                    let delay = frame.delay();
                    let buffer = std::mem::replace(frame, Frame::new(image::RgbaImage::new(0, 0)))
                        .into_buffer();
                    let mut img = DynamicImage::ImageRgba8(buffer);
                    f(&mut img)?;
                    *frame = Frame::from_parts(img.into_rgba8(), 0, 0, delay);
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests;
