use std::io::Cursor;

use image::codecs::gif::{GifDecoder, Repeat};
use image::metadata::Orientation;
use image::{AnimationDecoder, DynamicImage, Frame, ImageDecoder, ImageReader};
use turbojpeg::{Colorspace, Decompressor, ScalingFactor, Subsamp};

use super::jpeg::Region;
use super::{ImageFormat, ImagingError, Limits};
use crate::action::{Crop, CropAnchor, Gravity, Resize, ResizeMode};

/// Decoded pixels: one still image (always `Rgb8` or `Rgba8`), or the
/// composited frames of an animation.
#[derive(Clone)]
pub enum Pixels {
    Still(DynamicImage),
    Animated(Vec<Frame>),
}

/// Facts about the source that operations do not change.
#[derive(Debug, Clone)]
pub struct SourceMeta {
    pub format: ImageFormat,
    pub width: u32,
    pub height: u32,
    /// EXIF orientation 1-8 (1 when absent), already applied to the pixels.
    pub orientation: u8,
    /// `srgb`, `b-w` or `cmyk`.
    pub space: &'static str,
    pub frames: usize,
    /// How often an animated GIF plays, from its loop extension: a GIF
    /// without one plays once (`Finite(0)`). `Infinite` for other formats.
    pub repeat: Repeat,
}

impl SourceMeta {
    /// A still image's facts: one frame.
    fn still(
        format: ImageFormat,
        (width, height): (u32, u32),
        orientation: u8,
        space: &'static str,
    ) -> SourceMeta {
        SourceMeta {
            format,
            width,
            height,
            orientation,
            space,
            frames: 1,
            repeat: Repeat::Infinite,
        }
    }
}

/// The result of [`decode`].
#[derive(Clone)]
pub struct Decoded {
    pub pixels: Pixels,
    pub format: ImageFormat,
    pub meta: SourceMeta,
    /// True when decoding already did the lead crop.
    pub lead_applied: bool,
    /// Set when the decoder shrank the image or decoded only a region for a
    /// lead resize: where the pixels sit in the whole (oriented) image, so
    /// the resize sizes its output from the whole image, as without the
    /// shortcut, and samples exactly the part it covers.
    pub lead_frame: Option<LeadFrame>,
}

/// How decoded pixels map onto the whole oriented image they came from: the
/// image's point (x, y) is at pixel ((x - origin.0) / scale, (y - origin.1) /
/// scale). A JPEG shrunk by 1/`scale` rounds its sides up to whole pixels,
/// whose last row and column stand for a partial block: the image covers
/// only part of them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LeadFrame {
    /// The whole image's width and height, oriented.
    pub size: (u32, u32),
    /// The point of the whole image at the decoded pixels' top-left corner;
    /// negative where the decoded pixels reach past the image's start.
    pub origin: (f64, f64),
    /// Pixels of the whole image per decoded pixel: the shrink's 1, 2, 4 or 8.
    pub scale: f64,
}

impl LeadFrame {
    /// A rectangle `(left, top, width, height)` of the whole image, in pixels
    /// of the decoded one, kept inside its `dims`.
    pub fn to_pixels(&self, rect: (f64, f64, f64, f64), dims: (u32, u32)) -> (f64, f64, f64, f64) {
        let span = |start: f64, len: f64, origin: f64, size: u32| {
            let size = f64::from(size);
            let from = ((start - origin) / self.scale).clamp(0.0, size);
            let to = ((start + len - origin) / self.scale).clamp(from, size);
            (from, to - from)
        };
        let (l, w) = span(rect.0, rect.2, self.origin.0, dims.0);
        let (t, h) = span(rect.1, rect.3, self.origin.1, dims.1);
        (l, t, w, h)
    }
}

/// The frame of an unoriented `canvas` (in decoded pixels at 1/`denom`) of
/// a JPEG of `full` size once EXIF `orientation` turns it: the canvas
/// reaches past the image's right and bottom edges, which the orientation
/// moves to where the image's own axes start or end.
fn oriented_frame(full: (u32, u32), canvas: (u32, u32), denom: u32, orientation: u8) -> LeadFrame {
    let d = f64::from(denom);
    let (w, h) = (f64::from(full.0), f64::from(full.1));
    // How far the canvas reaches before the image starts, once mirrored.
    let (past_x, past_y) = (w - f64::from(canvas.0) * d, h - f64::from(canvas.1) * d);
    let (size, origin) = match orientation {
        2 => (full, (past_x, 0.0)),
        3 => (full, (past_x, past_y)),
        4 => (full, (0.0, past_y)),
        5 => ((full.1, full.0), (0.0, 0.0)),
        6 => ((full.1, full.0), (past_y, 0.0)),
        7 => ((full.1, full.0), (past_y, past_x)),
        8 => ((full.1, full.0), (0.0, past_x)),
        _ => (full, (0.0, 0.0)),
    };
    LeadFrame {
        size,
        origin,
        scale: d,
    }
}

/// Format and dimensions from the header, without decoding pixels.
pub fn probe(input: &[u8]) -> Result<(ImageFormat, u32, u32), ImagingError> {
    let format = sniff(input)?;
    let (w, h) = match format {
        ImageFormat::Jpeg => {
            let header = turbojpeg::read_header(input).map_err(|e| decode_error(format, e))?;
            (header.width as u32, header.height as u32)
        }
        _ => reader(input, format)?
            .into_dimensions()
            .map_err(|e| decode_error(format, e))?,
    };
    Ok((format, w, h))
}

/// Identifies the format from the leading bytes.
fn sniff(input: &[u8]) -> Result<ImageFormat, ImagingError> {
    // BigTIFF, which `image` does not recognise and its TIFF decoder reads.
    if input.starts_with(b"II\x2b\x00") || input.starts_with(b"MM\x00\x2b") {
        return Ok(ImageFormat::Tiff);
    }
    match image::guess_format(input) {
        Ok(image::ImageFormat::Jpeg) => Ok(ImageFormat::Jpeg),
        Ok(image::ImageFormat::Png) => Ok(ImageFormat::Png),
        Ok(image::ImageFormat::WebP) => Ok(ImageFormat::Webp),
        Ok(image::ImageFormat::Tiff) => Ok(ImageFormat::Tiff),
        Ok(image::ImageFormat::Gif) => Ok(ImageFormat::Gif),
        Ok(image::ImageFormat::Bmp) => Ok(ImageFormat::Bmp),
        _ => Err(ImagingError::UnknownFormat),
    }
}

fn decode_error(format: ImageFormat, e: impl std::fmt::Display) -> ImagingError {
    ImagingError::Decode {
        format: format.name(),
        message: decoder_message(&e.to_string()),
    }
}

/// A decoder's message as an error shows it: at most [`MESSAGE_CHARS`]
/// characters (a TIFF declaring 65535 samples a pixel had its decoder list
/// them all, 197 KB that went to the log and the notification), and std's
/// words for a read past the end said plainly.
fn decoder_message(message: &str) -> String {
    const MESSAGE_CHARS: usize = 300;
    let message = if message.contains("failed to fill whole buffer") {
        format!("{message} (the file ends early: cut short?)")
    } else {
        message.to_string()
    };
    crate::shown_up_to(&message, MESSAGE_CHARS)
}

fn check_pixels(
    format: ImageFormat,
    width: u32,
    height: u32,
    limits: &Limits,
) -> Result<(), ImagingError> {
    let pixels = width as u64 * height as u64;
    if pixels > limits.max_pixels {
        return Err(ImagingError::TooManyPixels {
            width,
            height,
            pixels,
            limit: limits.max_pixels,
        });
    }
    if width == 0 || height == 0 {
        return Err(decode_error(
            format,
            format!("it has no pixels ({width}x{height})"),
        ));
    }
    if width.max(height) > MAX_INPUT_SIDE {
        return Err(ImagingError::SideTooLong {
            width,
            height,
            limit: MAX_INPUT_SIDE,
        });
    }
    Ok(())
}

/// The longest side an input may have, the action language's largest size
/// too. The resampler keeps about 50 bytes of filter weights per pixel of
/// the side it shrinks, however small the output: a 100,000,000x1 PNG of
/// 291 KB, within the pixel limit, took 6 GB to resize to 100x1.
pub const MAX_INPUT_SIDE: u32 = 1 << 20;

fn reader(input: &[u8], format: ImageFormat) -> Result<ImageReader<Cursor<&[u8]>>, ImagingError> {
    let format = match format {
        ImageFormat::Jpeg => image::ImageFormat::Jpeg,
        ImageFormat::Png => image::ImageFormat::Png,
        ImageFormat::Webp => image::ImageFormat::WebP,
        ImageFormat::Tiff => image::ImageFormat::Tiff,
        ImageFormat::Gif => image::ImageFormat::Gif,
        ImageFormat::Bmp => image::ImageFormat::Bmp,
    };
    Ok(ImageReader::with_format(Cursor::new(input), format))
}

fn decoder_limits(limits: &Limits) -> image::Limits {
    let mut l = image::Limits::default();
    // Enough for the pixel limit at 16-bit RGBA; the pixel count itself is checked first.
    l.max_alloc = Some(limits.max_pixels.saturating_mul(8).saturating_add(64 << 20));
    l
}

/// Decodes `input` within `limits`, applying EXIF orientation. `lead` is the
/// pipeline's first geometric operation: before a resize, JPEG decodes at
/// 1/2, 1/4 or 1/8 size in the DCT domain as long as the result still covers
/// what the resize needs; before a crop or a cover resize it decodes only the
/// region used.
pub fn decode(input: &[u8], limits: &Limits, lead: Lead<'_>) -> Result<Decoded, ImagingError> {
    if input.len() > limits.max_input_bytes {
        return Err(ImagingError::input_too_large(input.len() as u64, limits));
    }
    let format = sniff(input)?;
    let mut decoded = match format {
        ImageFormat::Jpeg => decode_jpeg(input, limits, lead)?,
        ImageFormat::Gif => return decode_gif(input, limits, usize::MAX),
        ImageFormat::Png => return decode_png(input, limits),
        ImageFormat::Webp if webp_is_animated(input) => {
            return decode_webp_animation(input, limits);
        }
        ImageFormat::Tiff if tiff_is_ycbcr_jpeg(input) => return decode_tiff_ycbcr(input, limits),
        ImageFormat::Tiff => match decode_tiff_16(input, limits) {
            Some(decoded) => return decoded,
            None => return decode_generic(input, format, limits),
        },
        _ => return decode_generic(input, format, limits),
    };
    if let (Some(profile), Pixels::Still(img)) =
        (super::colour::jpeg_profile(input), &mut decoded.pixels)
    {
        super::colour::to_srgb(img, &profile);
    }
    Ok(decoded)
}

/// A file's EXIF block, parsed. A WebP's `EXIF` chunk may start with the
/// `Exif\0\0` marker that JPEG's APP1 segment carries (as some writers
/// put it; libvips, sharp and Pillow read both forms), which the EXIF
/// reader's own WebP support does not skip.
pub(super) fn read_exif(input: &[u8]) -> Option<exif::Exif> {
    match webp_chunk(input, b"EXIF") {
        Some(chunk) => {
            let tiff = chunk.strip_prefix(b"Exif\0\0").unwrap_or(chunk);
            exif::Reader::new().read_raw(tiff.to_vec()).ok()
        }
        None => exif::Reader::new()
            .read_from_container(&mut Cursor::new(input))
            .ok(),
    }
}

/// The payload of a WebP file's first chunk named `id`, from its RIFF
/// container (`None` for any other file, or a WebP without that chunk).
pub(super) fn webp_chunk<'a>(input: &'a [u8], id: &[u8; 4]) -> Option<&'a [u8]> {
    if input.get(..4)? != b"RIFF" || input.get(8..12)? != b"WEBP" {
        return None;
    }
    let mut rest = input.get(12..)?;
    while rest.len() >= 8 {
        let size = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
        let payload = rest.get(8..8usize.checked_add(size)?)?;
        if &rest[..4] == id {
            return Some(payload);
        }
        // Chunks are padded to an even length.
        rest = rest.get(8 + size + (size & 1)..).unwrap_or(&[]);
    }
    None
}

fn exif_orientation(input: &[u8]) -> u8 {
    read_exif(input)
        .and_then(|e| {
            e.get_field(exif::Tag::Orientation, exif::In::PRIMARY)
                .and_then(|f| f.value.get_uint(0))
        })
        .filter(|o| (1..=8).contains(o))
        .map(|o| o as u8)
        .unwrap_or(1)
}

fn orient(img: DynamicImage, orientation: u8) -> DynamicImage {
    let mut img = img;
    if let Some(o) = Orientation::from_exif(orientation) {
        img.apply_orientation(o);
    }
    img
}

fn decode_jpeg(input: &[u8], limits: &Limits, lead: Lead<'_>) -> Result<Decoded, ImagingError> {
    let format = ImageFormat::Jpeg;
    let mut d = Decompressor::new().map_err(|e| decode_error(format, e))?;
    d.set_scan_limit(super::jpeg_progressive::MAX_SCANS as u32)
        .map_err(|e| decode_error(format, e))?;
    let header = d.read_header(input).map_err(|e| match e {
        // TurboJPEG reads a file that ends before its frame header as
        // one of width -1.
        turbojpeg::Error::IntegerOverflow(_) => {
            decode_error(format, "the file ends before its frame header (cut short?)")
        }
        e => decode_error(format, e),
    })?;
    let (width, height) = (header.width as u32, header.height as u32);
    check_pixels(format, width, height, limits)?;
    let orientation = exif_orientation(input);
    let space = match header.colorspace {
        Colorspace::Gray => "b-w",
        Colorspace::CMYK | Colorspace::YCCK => "cmyk",
        _ => "srgb",
    };
    let meta = SourceMeta::still(format, (width, height), orientation, space);
    if space == "cmyk" {
        let img = decode_cmyk(&mut d, input, (width, height))?;
        return Ok(Decoded {
            pixels: Pixels::Still(orient(img, orientation)),
            format,
            meta,
            lead_applied: false,
            lead_frame: None,
        });
    }
    let plan = plan_oriented(lead, (width, height), orientation);
    let denom = plan.denom;
    let factor = ScalingFactor::new(1, denom as usize);
    let scaled = header.scaled(factor);
    let (sw, sh) = (scaled.width as u32, scaled.height as u32);
    // The exact region wanted, in scaled pixels.
    let want = plan.region.unwrap_or(Region {
        x: 0,
        y: 0,
        width: sw,
        height: sh,
    });
    // libjpeg-turbo upsamples chroma at a region's edges as at the image's,
    // repeating the edge sample where the full decode blends in the next
    // one (45 levels off at a colour edge). So the decoded region reaches
    // one iMCU further on every side the image continues, and the wanted
    // pixels, cut from it, are the full decode's. Its left edge sits on an
    // iMCU boundary, as TurboJPEG asks.
    let mcu = super::jpeg::scaled_mcu_width(header.subsamp, denom);
    let mcu_rows = (header.subsamp.mcu_height() as u32 / denom).max(1);
    let decoded_region = {
        let x = (want.x - want.x % mcu).saturating_sub(mcu);
        let y = want.y.saturating_sub(mcu_rows);
        Region {
            x,
            y,
            width: (want.x + want.width).saturating_add(mcu).min(sw) - x,
            height: (want.y + want.height).saturating_add(mcu_rows).min(sh) - y,
        }
    };
    // A region is planned only for unrotated files.
    let lead_frame = match (lead, plan.region) {
        (Lead::Resize(_), Some(region)) => Some(LeadFrame {
            size: (width, height),
            origin: (
                f64::from(region.x) * f64::from(denom),
                f64::from(region.y) * f64::from(denom),
            ),
            scale: f64::from(denom),
        }),
        (Lead::Resize(_), None) if denom > 1 => Some(oriented_frame(
            (width, height),
            (sw, sh),
            denom,
            orientation,
        )),
        _ => None,
    };
    // At 1/8 each block becomes one pixel from its DC coefficient alone, so a
    // progressive file's AC scans (most of its bytes) need not be decoded,
    // and a baseline file's AC codes need only be skipped: our own DC
    // decoder does either (or failing that, libjpeg-turbo is given the file,
    // if progressive, without its AC scans).
    if denom == 8
        && let Some(eighth) = super::jpeg_dc::decode_eighth(
            input,
            super::jpeg_dc::Precision::HALF_LEVEL,
            (width, height),
        )
        && (eighth.width, eighth.height) == (sw, sh)
    {
        let whole = image::RgbImage::from_raw(eighth.width, eighth.height, eighth.rgb)
            .ok_or_else(|| decode_error(format, "decoded buffer has the wrong size"))?;
        let buffer = if (want.width, want.height) == (sw, sh) {
            whole
        } else {
            image::imageops::crop_imm(&whole, want.x, want.y, want.width, want.height).to_image()
        };
        return Ok(Decoded {
            pixels: Pixels::Still(orient(DynamicImage::ImageRgb8(buffer), orientation)),
            format,
            meta,
            lead_applied: plan.crop_applied,
            lead_frame,
        });
    }
    // A narrow region of a progressive file at full scale: libjpeg-turbo
    // would entropy-decode every scan and then transform only the region.
    // Our decoder does the first faster and the second as libjpeg-turbo
    // does, pixel for pixel (see `jpeg_progressive`); a wide region is left
    // to libjpeg-turbo's SIMD transforms.
    if denom == 1
        && header.is_progressive
        && matches!(header.colorspace, Colorspace::YCbCr | Colorspace::Gray)
        // The subsamplings its upsampler covers, known before decoding.
        && matches!(
            header.subsamp,
            Subsamp::None | Subsamp::Sub2x1 | Subsamp::Sub2x2 | Subsamp::Gray
        )
        && plan.region.is_some()
        && u64::from(want.width) * u64::from(want.height) * 4 <= u64::from(sw) * u64::from(sh)
    {
        let max_blocks = (sw as usize).div_ceil(8).saturating_add(4)
            * (sh as usize).div_ceil(8).saturating_add(4)
            * 3;
        let area = (
            want.x as usize,
            want.y as usize,
            want.width as usize,
            want.height as usize,
        );
        if let Some(rgb) = super::jpeg_progressive::decode(input, max_blocks)
            .and_then(|c| super::jpeg_progressive::region_rgb(&c, area))
        {
            let buffer = image::RgbImage::from_raw(want.width, want.height, rgb)
                .ok_or_else(|| decode_error(format, "decoded buffer has the wrong size"))?;
            return Ok(Decoded {
                pixels: Pixels::Still(orient(DynamicImage::ImageRgb8(buffer), orientation)),
                format,
                meta,
                lead_applied: plan.crop_applied,
                lead_frame,
            });
        }
    }
    // At 1/2 and 1/4, a progressive file saved at the highest quality may
    // not need its last refinement scans (see `jpeg_refine`).
    let trimmed = match denom {
        _ if !header.is_progressive => None,
        8 => dc_scans_only(input),
        _ => super::jpeg_refine::without_spare_refinements(input, denom),
    };
    let pixels = match trimmed.map(|t| super::jpeg::decode_rgb(&t, denom, decoded_region)) {
        Some(Ok(pixels)) => pixels,
        // The shortened file failed (a damaged file our parser let through):
        // the whole one gets the decoder's own verdict.
        _ => super::jpeg::decode_rgb(input, denom, decoded_region)
            .map_err(|e| decode_error(format, e))?,
    };
    let mut buffer = image::RgbImage::from_raw(decoded_region.width, decoded_region.height, pixels)
        .ok_or_else(|| decode_error(format, "decoded buffer has the wrong size"))?;
    if decoded_region != want {
        let (x, y) = (want.x - decoded_region.x, want.y - decoded_region.y);
        buffer = image::imageops::crop_imm(&buffer, x, y, want.width, want.height).to_image();
    }
    Ok(Decoded {
        pixels: Pixels::Still(orient(DynamicImage::ImageRgb8(buffer), orientation)),
        format,
        meta,
        lead_applied: plan.crop_applied,
        lead_frame,
    })
}

/// A CMYK or YCCK JPEG in RGB. libjpeg-turbo gives the CMYK values as
/// stored (converting YCCK to CMYK), which Adobe's files, nearly all CMYK
/// JPEGs, keep inverted. With an embedded CMYK profile the pixels go
/// through it to sRGB (inverted back first when the file has Adobe's
/// marker), as libvips and sharp do. Without one, each of C, M and Y is
/// scaled by K (`x * k / 255`, after inverting a file without Adobe's
/// marker), the conversion the image crate's decoder made. Either is done in place (4 bytes a pixel at most). That decoder
/// also filled a file cut short with grey and called it decoded;
/// libjpeg-turbo refuses it, as it does every other damaged JPEG.
fn decode_cmyk(
    d: &mut Decompressor,
    input: &[u8],
    (width, height): (u32, u32),
) -> Result<DynamicImage, ImagingError> {
    let format = ImageFormat::Jpeg;
    let (w, h) = (width as usize, height as usize);
    let mut cmyk = turbojpeg::Image {
        pixels: vec![0u8; w * h * 4],
        width: w,
        pitch: w * 4,
        height: h,
        format: turbojpeg::PixelFormat::CMYK,
    };
    d.decompress(input, cmyk.as_deref_mut())
        .map_err(|e| decode_error(format, e))?;
    let mut pixels = cmyk.pixels;
    let inverted = has_adobe_marker(input);
    let profile = super::colour::jpeg_profile(input);
    if let Some(profile) = profile
        && super::colour::cmyk_to_srgb(&mut pixels, &profile, inverted)
            .map_err(|e| decode_error(format, e))?
    {
        return image::RgbImage::from_raw(width, height, pixels)
            .map(DynamicImage::ImageRgb8)
            .ok_or_else(|| decode_error(format, "decoded buffer has the wrong size"));
    }
    // Stored inverted (Adobe's marker) 255 is no ink; otherwise 0 is.
    let flip = if inverted { 0 } else { 255 };
    let scale = |x: u8, k: u8| {
        let t = u32::from(x ^ flip) * u32::from(k ^ flip) + 128;
        ((t + (t >> 8)) >> 8) as u8
    };
    // In place, pixel i's RGB over bytes 3i..3i+3, which its own CMYK (at
    // 4i) and the pixels before it have already given up.
    let mut rgb = pixels;
    for i in 0..w * h {
        let [c, m, y, k] = [rgb[4 * i], rgb[4 * i + 1], rgb[4 * i + 2], rgb[4 * i + 3]];
        rgb[3 * i..3 * i + 3].copy_from_slice(&[scale(c, k), scale(m, k), scale(y, k)]);
    }
    rgb.truncate(w * h * 3);
    image::RgbImage::from_raw(width, height, rgb)
        .map(DynamicImage::ImageRgb8)
        .ok_or_else(|| decode_error(format, "decoded buffer has the wrong size"))
}

/// Whether a JPEG carries Adobe's APP14 segment, whose CMYK samples are
/// stored inverted (255 for no ink), as libjpeg and libvips take it.
fn has_adobe_marker(jpeg: &[u8]) -> bool {
    super::jpeg_dc::header_segments(jpeg)
        .any(|(marker, body)| marker == 0xee && body.starts_with(b"Adobe"))
}

/// The pipeline's first geometric operation, which the JPEG decoder can
/// fold into decoding: a resize lets it shrink on load, a crop (or a cover
/// resize) lets it decode only the region.
#[derive(Debug, Clone, Copy)]
pub enum Lead<'a> {
    Nothing,
    Resize(&'a Resize),
    Crop(&'a Crop),
}

struct JpegPlan {
    denom: u32,
    region: Option<Region>,
    /// The lead crop is done: the caller skips it.
    crop_applied: bool,
}

/// How to decode a JPEG of `full` size with EXIF `orientation` for `lead`.
fn plan_oriented(lead: Lead<'_>, full: (u32, u32), orientation: u8) -> JpegPlan {
    if orientation == 1 {
        return plan_jpeg(lead, full);
    }
    // The lead operation is in oriented coordinates; only shrink then.
    let oriented = if orientation >= 5 {
        (full.1, full.0)
    } else {
        full
    };
    JpegPlan {
        denom: match lead {
            Lead::Resize(r) => shrink_denom(super::geometry::scaled_size(r, oriented), oriented),
            _ => 1,
        },
        region: None,
        crop_applied: false,
    }
}

/// True when `head`, the start of a file, is a progressive JPEG that
/// [`decode`] would shrink to 1/8 for `lead`, so that only its DC scans are
/// used. `head` must hold every segment before the first scan (EXIF
/// included), or the answer is false.
pub fn eighth_scale_suffices(head: &[u8], lead: Lead<'_>) -> bool {
    // Walk the segments first: most files are not progressive, and this
    // answers for them without setting up a decoder.
    let mut at = 2;
    let mut progressive = false;
    let reaches_scan = head.starts_with(&[0xff, 0xd8])
        && loop {
            match super::jpeg_dc::segment(head, at) {
                Some((0xda, _, _)) => break true,
                Some((0xd9, _, _)) | None => break false,
                Some((marker, _, end)) => {
                    progressive |= marker == 0xc2;
                    at = end;
                }
            }
        };
    if !reaches_scan || !progressive {
        return false;
    }
    let Ok(header) = turbojpeg::read_header(head) else {
        return false;
    };
    let cmyk = matches!(header.colorspace, Colorspace::CMYK | Colorspace::YCCK);
    let full = (header.width as u32, header.height as u32);
    header.is_progressive && !cmyk && plan_oriented(lead, full, exif_orientation(head)).denom == 8
}

/// The largest DCT shrink (8, 4, 2 or 1) that still leaves at least
/// `needed` pixels of the `source` size.
fn shrink_denom(needed: (u32, u32), source: (u32, u32)) -> u32 {
    let ratio =
        (source.0 as f64 / needed.0.max(1) as f64).min(source.1 as f64 / needed.1.max(1) as f64);
    [8u32, 4, 2]
        .into_iter()
        .find(|&d| d as f64 <= ratio)
        .unwrap_or(1)
}

/// How to decode an unrotated JPEG of `full` size for `lead`.
fn plan_jpeg(lead: Lead<'_>, full: (u32, u32)) -> JpegPlan {
    let scaled = |v: u32, d: u32| v.div_ceil(d);
    match lead {
        Lead::Crop(c) if c.anchor != CropAnchor::Gravity(Gravity::Auto) => {
            match super::geometry::crop_rect(c, full) {
                Ok((x, y, width, height)) => JpegPlan {
                    denom: 1,
                    region: Some(Region {
                        x,
                        y,
                        width,
                        height,
                    }),
                    crop_applied: true,
                },
                Err(_) => JpegPlan {
                    denom: 1,
                    region: None,
                    crop_applied: false,
                },
            }
        }
        Lead::Resize(r) => match (r.width, r.height, r.mode) {
            (Some(w), Some(h), ResizeMode::Cover) => {
                // Only the centred region with the box's aspect ratio is used.
                let (cx, cy, cw, ch) = super::geometry::cover_region(full, (w, h));
                let denom = shrink_denom((w, h), (cw.floor() as u32, ch.floor() as u32));
                let d = denom as f64;
                let (sw, sh) = (scaled(full.0, denom), scaled(full.1, denom));
                let x0 = ((cx / d).floor() as u32).min(sw.saturating_sub(1));
                let y0 = ((cy / d).floor() as u32).min(sh.saturating_sub(1));
                let x1 = (((cx + cw) / d).ceil() as u32).clamp(x0 + 1, sw);
                let y1 = (((cy + ch) / d).ceil() as u32).clamp(y0 + 1, sh);
                JpegPlan {
                    denom,
                    region: Some(Region {
                        x: x0,
                        y: y0,
                        width: x1 - x0,
                        height: y1 - y0,
                    }),
                    crop_applied: false,
                }
            }
            _ => JpegPlan {
                denom: shrink_denom(super::geometry::scaled_size(r, full), full),
                region: None,
                crop_applied: false,
            },
        },
        _ => JpegPlan {
            denom: 1,
            region: None,
            crop_applied: false,
        },
    }
}

/// Brings every decoded layout to 8-bit RGB or RGBA.
fn normalize(img: DynamicImage) -> DynamicImage {
    match img {
        DynamicImage::ImageRgb8(_) | DynamicImage::ImageRgba8(_) => img,
        other if other.color().has_alpha() => DynamicImage::ImageRgba8(other.to_rgba8()),
        other => DynamicImage::ImageRgb8(other.to_rgb8()),
    }
}

fn decode_generic(
    input: &[u8],
    format: ImageFormat,
    limits: &Limits,
) -> Result<Decoded, ImagingError> {
    let mut r = reader(input, format)?;
    r.limits(decoder_limits(limits));
    let mut decoder = r.into_decoder().map_err(|e| decode_error(format, e))?;
    let profile = decoder.icc_profile().ok().flatten();
    let (width, height) = decoder.dimensions();
    check_pixels(format, width, height, limits)?;
    // A WebP's own: the decoder misses an EXIF chunk with a marker.
    let orientation = match format {
        ImageFormat::Webp => exif_orientation(input),
        _ => decoder
            .orientation()
            .ok()
            .map(orientation_number)
            .unwrap_or(1),
    };
    // As stored: a CMYK TIFF comes out of the decoder as RGB.
    use image::ExtendedColorType as Stored;
    let space = match decoder.original_color_type() {
        Stored::L1
        | Stored::La1
        | Stored::L2
        | Stored::La2
        | Stored::L4
        | Stored::La4
        | Stored::L8
        | Stored::La8
        | Stored::L16
        | Stored::La16 => "b-w",
        Stored::Cmyk8 | Stored::Cmyk16 => "cmyk",
        _ => "srgb",
    };
    let stored = decoder.original_color_type();
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| match e {
        // The decoder's own "Memory limit exceeded" says nothing of why.
        image::ImageError::Limits(_) => decode_error(
            format,
            format!(
                "decoding its {width}x{height} pixels as stored ({stored:?}) would take more \
                 memory than the pixel limit allows ({} bytes: 8 a pixel and 64 MiB), or \
                 the file declares more data than its pixels need",
                decoder_limits(limits).max_alloc.unwrap_or(u64::MAX)
            ),
        ),
        e => decode_error(format, e),
    })?;
    if format == ImageFormat::Tiff && img.color().has_alpha() && tiff_alpha_is_associated(input) {
        img = DynamicImage::ImageRgba8(unpremultiply(img.into_rgba8()));
    }
    let meta = SourceMeta::still(format, (width, height), orientation, space);
    Ok(still_decoded(img, profile, meta))
}

/// A still image decoded whole: in 8-bit RGB(A), in sRGB where `profile`
/// says it is not (see [`super::colour`]), and oriented.
fn still_decoded(img: DynamicImage, profile: Option<Vec<u8>>, meta: SourceMeta) -> Decoded {
    let mut img = normalize(img);
    if let Some(profile) = profile {
        super::colour::to_srgb(&mut img, &profile);
    }
    Decoded {
        pixels: Pixels::Still(orient(img, meta.orientation)),
        format: meta.format,
        meta,
        lead_applied: false,
        lead_frame: None,
    }
}

/// A PNG through the `png` crate, which gives 8-bit samples as it decodes
/// (the image crate gives a 16-bit file's samples whole, 8 bytes a pixel
/// for RGBA, and its conversion to 8-bit then needs 4 more: 1.2 GB for a
/// file of 100 million pixels). Its profile is read with a cap here (see
/// [`super::colour::png_profile`]) and skipped by the decoder, as are its
/// text chunks.
fn decode_png(input: &[u8], limits: &Limits) -> Result<Decoded, ImagingError> {
    let format = ImageFormat::Png;
    let error = |e: png::DecodingError| decode_error(format, e);
    let mut decoder = png::Decoder::new(Cursor::new(input));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    decoder.set_ignore_iccp_chunk(true);
    decoder.set_ignore_text_chunk(true);
    decoder.set_limits(png::Limits {
        bytes: decoder_limits(limits).max_alloc.unwrap_or(u64::MAX) as usize,
    });
    let mut reader = decoder.read_info().map_err(error)?;
    let (width, height) = (reader.info().width, reader.info().height);
    check_pixels(format, width, height, limits)?;
    let grey = matches!(
        reader.info().color_type,
        png::ColorType::Grayscale | png::ColorType::GrayscaleAlpha
    );
    // An animated PNG gives its first frame (its default image); `info`
    // still tells how many it has.
    let frames = reader
        .info()
        .animation_control()
        .map_or(1, |a| a.num_frames as usize);
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| decode_error(format, "the image is too large to address"))?;
    let mut buf = vec![0u8; size];
    let frame = reader.next_frame(&mut buf).map_err(error)?;
    buf.truncate(frame.buffer_size());
    let (w, h) = (frame.width, frame.height);
    let wrong_size = || decode_error(format, "decoded buffer has the wrong size");
    let img = match frame.color_type {
        png::ColorType::Rgb => image::RgbImage::from_raw(w, h, buf).map(DynamicImage::ImageRgb8),
        png::ColorType::Rgba => image::RgbaImage::from_raw(w, h, buf).map(DynamicImage::ImageRgba8),
        png::ColorType::Grayscale => {
            image::GrayImage::from_raw(w, h, buf).map(DynamicImage::ImageLuma8)
        }
        png::ColorType::GrayscaleAlpha => {
            image::GrayAlphaImage::from_raw(w, h, buf).map(DynamicImage::ImageLumaA8)
        }
        // Palettes are expanded to RGB(A) above.
        png::ColorType::Indexed => None,
    }
    .ok_or_else(wrong_size)?;
    let space = if grey { "b-w" } else { "srgb" };
    let meta = SourceMeta {
        frames,
        ..SourceMeta::still(format, (width, height), exif_orientation(input), space)
    };
    Ok(still_decoded(img, super::colour::png_profile(input), meta))
}

fn orientation_number(o: Orientation) -> u8 {
    match o {
        Orientation::NoTransforms => 1,
        Orientation::FlipHorizontal => 2,
        Orientation::Rotate180 => 3,
        Orientation::FlipVertical => 4,
        Orientation::Rotate90FlipH => 5,
        Orientation::Rotate90 => 6,
        Orientation::Rotate270FlipH => 7,
        Orientation::Rotate270 => 8,
    }
}

/// How much larger than its screen a GIF's frame may be, in bytes of RGBA.
const FRAME_SLACK_BYTES: u64 = 16 << 20;

/// Decodes the first frame of an animation, or the still image: a watermark
/// overlay, which never animates, need not decode the other frames.
pub fn decode_first_frame(input: &[u8], limits: &Limits) -> Result<DynamicImage, ImagingError> {
    if input.len() > limits.max_input_bytes {
        return Err(ImagingError::input_too_large(input.len() as u64, limits));
    }
    let decoded = match sniff(input)? {
        ImageFormat::Gif => decode_gif(input, limits, 1)?,
        // An animated WebP's first frame, as `image` decodes a still.
        ImageFormat::Webp => decode_generic(input, ImageFormat::Webp, limits)?,
        _ => decode(input, limits, Lead::Nothing)?,
    };
    Ok(decoded.pixels.into_first_frame())
}

/// Decodes a GIF's frames, at most `wanted` of them.
fn decode_gif(input: &[u8], limits: &Limits, wanted: usize) -> Result<Decoded, ImagingError> {
    let format = ImageFormat::Gif;
    let mut decoder = GifDecoder::new(Cursor::new(input)).map_err(|e| decode_error(format, e))?;
    let (width, height) = decoder.dimensions();
    check_pixels(format, width, height, limits)?;
    let per_frame = width as u64 * height as u64;
    // The decoder keeps its canvas (the logical screen) reserved, and for
    // each frame reserves the frame's own buffer, sized by the frame's
    // descriptor, and a second canvas to composite a partial frame on. A
    // frame at most the screen plus the slack fits; a frame far larger, a
    // bomb of a few bytes that would allocate gigabytes, is refused before
    // it is allocated.
    let budget = per_frame * 4 * 3 + FRAME_SLACK_BYTES;
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_alloc = Some(budget);
    decoder
        .set_limits(decoder_limits)
        .map_err(|e| decode_error(format, e))?;
    // Counted first, without decoding: each frame is composited onto a
    // whole screen, so one frame past the limit used to cost a screen's
    // worth of memory before it was refused (1.15 GB for two one-pixel
    // frames on a 10000x10000 screen).
    let count = gif_frame_count(input, limits.max_frames.saturating_add(1)).min(wanted);
    if count > limits.max_frames
        || per_frame.saturating_mul(count as u64) > limits.max_animation_pixels
    {
        return Err(ImagingError::AnimationTooLarge {
            frames: count,
            width,
            height,
            limit: format!(
                "{} frames and {} frame pixels",
                limits.max_frames, limits.max_animation_pixels
            ),
        });
    }
    let frames = decoder.into_frames().take(wanted).map(|frame| {
        frame.map_err(|e| match e {
            image::ImageError::Limits(_) => decode_error(
                format,
                format!(
                    "a frame is larger than its {width}x{height} screen allows \
                     (frames may exceed the screen by at most {} pixels)",
                    FRAME_SLACK_BYTES / 4
                ),
            ),
            e => decode_error(format, e),
        })
    });
    collect_frames(frames, format, (width, height), gif_repeat(input), limits)
}

/// An animation decoded from its composited frames, held to the frame and
/// frame-pixel limits as they come; one frame is a still image, opaque (RGB)
/// when no pixel is transparent.
fn collect_frames(
    frames: impl Iterator<Item = Result<Frame, ImagingError>>,
    format: ImageFormat,
    (width, height): (u32, u32),
    repeat: Repeat,
    limits: &Limits,
) -> Result<Decoded, ImagingError> {
    let per_frame = width as u64 * height as u64;
    let mut kept = Vec::new();
    for frame in frames {
        kept.push(frame?);
        let total = per_frame * kept.len() as u64;
        if kept.len() > limits.max_frames || total > limits.max_animation_pixels {
            return Err(ImagingError::AnimationTooLarge {
                frames: kept.len(),
                width,
                height,
                limit: format!(
                    "{} frames and {} frame pixels",
                    limits.max_frames, limits.max_animation_pixels
                ),
            });
        }
    }
    let count = kept.len();
    let pixels = if count > 1 {
        Pixels::Animated(kept)
    } else {
        let buffer = kept
            .into_iter()
            .next()
            .ok_or_else(|| decode_error(format, "no frames"))?
            .into_buffer();
        // A GIF keeps transparency as a palette entry: one that uses none
        // is an opaque image.
        Pixels::Still(if buffer.pixels().all(|p| p[3] == u8::MAX) {
            DynamicImage::ImageRgb8(DynamicImage::ImageRgba8(buffer).into_rgb8())
        } else {
            DynamicImage::ImageRgba8(buffer)
        })
    };
    Ok(Decoded {
        pixels,
        format,
        meta: SourceMeta {
            frames: count,
            repeat,
            ..SourceMeta::still(format, (width, height), 1, "srgb")
        },
        lead_applied: false,
        lead_frame: None,
    })
}

/// Whether a WebP file is an animation: its VP8X header's animation flag.
fn webp_is_animated(input: &[u8]) -> bool {
    input.len() > 20 && &input[12..16] == b"VP8X" && input[20] & 0x02 != 0
}

/// An animated WebP's composited frames, by libwebp's own decoder, on a
/// clear canvas (browsers ignore the background colour the file suggests,
/// often opaque white). The frame count is in the header, so the limits are
/// checked before any frame is decoded.
fn decode_webp_animation(input: &[u8], limits: &Limits) -> Result<Decoded, ImagingError> {
    let format = ImageFormat::Webp;
    // The canvas from the VP8X header (24 bits each, less one) is held to
    // the pixel limit before libwebp allocates two canvases of it.
    if let Some(header) = input.get(24..30) {
        let side = |b: &[u8]| 1 + (u32::from(b[0]) | u32::from(b[1]) << 8 | u32::from(b[2]) << 16);
        check_pixels(format, side(&header[..3]), side(&header[3..]), limits)?;
    }
    let mut decoder = super::webp_anim::Decoder::new(input).map_err(|e| decode_error(format, e))?;
    let info = decoder.info();
    let (width, height) = (info.width, info.height);
    check_pixels(format, width, height, limits)?;
    let total = u64::from(width) * u64::from(height) * u64::from(info.frames);
    if info.frames as usize > limits.max_frames || total > limits.max_animation_pixels {
        return Err(ImagingError::AnimationTooLarge {
            frames: info.frames as usize,
            width,
            height,
            limit: format!(
                "{} frames and {} frame pixels",
                limits.max_frames, limits.max_animation_pixels
            ),
        });
    }
    // WebP counts plays (0: forever); a GIF's extension, which the encoder
    // takes, counts repeats.
    let repeat = match info.loop_count {
        0 => Repeat::Infinite,
        plays => Repeat::Finite(u16::try_from(plays - 1).unwrap_or(u16::MAX)),
    };
    let frames = std::iter::from_fn(|| decoder.next_frame().transpose())
        .map(|frame| frame.map_err(|e| decode_error(format, e)));
    let mut decoded = collect_frames(frames, format, (width, height), repeat, limits)?;
    // Its colour profile and EXIF orientation, as for a still WebP, on
    // every frame.
    let profile = webp_chunk(input, b"ICCP");
    let layout = moxcms::Layout::Rgba;
    if let Some(conversion) = profile.and_then(|p| super::colour::SrgbConversion::new(p, layout)) {
        decoded.pixels.for_each_frame(|img| {
            conversion.apply(img);
            Ok(())
        })?;
    }
    let orientation = exif_orientation(input);
    if let Some(o) = Orientation::from_exif(orientation).filter(|_| orientation != 1) {
        decoded.pixels.for_each_frame(|img| {
            img.apply_orientation(o);
            Ok(())
        })?;
        decoded.meta.orientation = orientation;
    }
    Ok(decoded)
}

/// Whether a TIFF is JPEG-compressed YCbCr, as libvips writes it at the
/// default quality and sharp by default: the image crate refuses its
/// colour type.
fn tiff_is_ycbcr_jpeg(input: &[u8]) -> bool {
    let Ok(mut decoder) = tiff::decoder::Decoder::new(Cursor::new(input)) else {
        return false;
    };
    let compression = decoder.find_tag_unsigned::<u16>(tiff::tags::Tag::Compression);
    matches!(decoder.colortype(), Ok(tiff::ColorType::YCbCr(8)))
        && matches!(compression, Ok(Some(7)))
}

/// A TIFF decoder held to `limits`' memory bound.
type TiffDecoder<'a> = tiff::decoder::Decoder<Cursor<&'a [u8]>>;

fn tiff_decoder<'a>(input: &'a [u8], limits: &Limits) -> Result<TiffDecoder<'a>, tiff::TiffError> {
    let mut tiff_limits = tiff::decoder::Limits::default();
    let max_alloc = decoder_limits(limits).max_alloc.unwrap_or(u64::MAX);
    tiff_limits.decoding_buffer_size = usize::try_from(max_alloc).unwrap_or(usize::MAX);
    Ok(tiff::decoder::Decoder::new(Cursor::new(input))?.with_limits(tiff_limits))
}

/// A TIFF's orientation (1 when absent or not 1-8) and ICC profile.
fn tiff_orientation_and_profile(decoder: &mut TiffDecoder<'_>) -> (u8, Option<Vec<u8>>) {
    let orientation = decoder
        .find_tag_unsigned::<u16>(tiff::tags::Tag::Orientation)
        .ok()
        .flatten()
        .and_then(|o| u8::try_from(o).ok())
        .filter(|o| (1..=8).contains(o))
        .unwrap_or(1);
    let profile = decoder.get_tag_u8_vec(tiff::tags::Tag::IccProfile).ok();
    (orientation, profile)
}

/// A JPEG-compressed YCbCr TIFF: the tiff crate decodes its strips or
/// tiles to full-size YCbCr samples, brought here to RGB as libjpeg does
/// (full range, BT.601: what JPEG data holds whatever the TIFF's
/// reference tags say).
fn decode_tiff_ycbcr(input: &[u8], limits: &Limits) -> Result<Decoded, ImagingError> {
    let format = ImageFormat::Tiff;
    let error = |e: tiff::TiffError| decode_error(format, e);
    let mut decoder = tiff_decoder(input, limits).map_err(error)?;
    let (width, height) = decoder.dimensions().map_err(error)?;
    check_pixels(format, width, height, limits)?;
    // The crate gives a planar file's first plane alone.
    if let Ok(Some(2)) = decoder.find_tag_unsigned::<u16>(tiff::tags::Tag::PlanarConfiguration) {
        return Err(decode_error(
            format,
            "YCbCr stored in separate planes (PlanarConfiguration 2) is not read",
        ));
    }
    let (orientation, profile) = tiff_orientation_and_profile(&mut decoder);
    let tiff::decoder::DecodingResult::U8(mut samples) = decoder.read_image().map_err(error)?
    else {
        return Err(decode_error(format, "YCbCr samples that are not 8-bit"));
    };
    if samples.len() != width as usize * height as usize * 3 {
        return Err(decode_error(format, "decoded buffer has the wrong size"));
    }
    for px in samples.chunks_exact_mut(3) {
        let y = f32::from(px[0]);
        let (cb, cr) = (f32::from(px[1]) - 128.0, f32::from(px[2]) - 128.0);
        px[0] = (y + 1.402 * cr).round().clamp(0.0, 255.0) as u8;
        px[1] = (y - 0.344_136 * cb - 0.714_136 * cr)
            .round()
            .clamp(0.0, 255.0) as u8;
        px[2] = (y + 1.772 * cb).round().clamp(0.0, 255.0) as u8;
    }
    let img = image::RgbImage::from_raw(width, height, samples)
        .map(DynamicImage::ImageRgb8)
        .ok_or_else(|| decode_error(format, "decoded buffer has the wrong size"))?;
    let meta = SourceMeta::still(format, (width, height), orientation, "srgb");
    Ok(still_decoded(img, profile, meta))
}

/// A 16-bit TIFF of unsigned grey or RGB samples (with or without alpha)
/// in strips, brought to 8 bits a strip at a time: the image crate holds
/// the whole 16-bit image and then its 8-bit copy, 12 bytes a pixel for
/// RGBA (a 780 KB file of 100 million pixels took 1.57 GB), where this
/// holds the 8-bit image and one strip. `None` for any other TIFF, which
/// the image crate decodes as before.
pub(super) fn decode_tiff_16(
    input: &[u8],
    limits: &Limits,
) -> Option<Result<Decoded, ImagingError>> {
    use tiff::tags::Tag;
    let format = ImageFormat::Tiff;
    let mut decoder = tiff_decoder(input, limits).ok()?;
    let (channels, grey) = match decoder.colortype().ok()? {
        tiff::ColorType::Gray(16) => (1, true),
        tiff::ColorType::GrayA(16) => (2, true),
        tiff::ColorType::RGB(16) => (3, false),
        tiff::ColorType::RGBA(16) => (4, false),
        _ => return None,
    };
    let tag = |decoder: &mut tiff::decoder::Decoder<_>, tag| {
        decoder.find_tag_unsigned::<u16>(tag).ok().flatten()
    };
    // Black is zero (grey) or RGB; one plane; unsigned samples; strips.
    let photometric_ok = matches!(
        tag(&mut decoder, Tag::PhotometricInterpretation),
        Some(1 | 2)
    );
    let planar_ok = matches!(tag(&mut decoder, Tag::PlanarConfiguration), None | Some(1));
    // One value for each sample.
    let unsigned = match decoder.find_tag_unsigned_vec::<u16>(Tag::SampleFormat) {
        Ok(None) => true,
        Ok(Some(formats)) => formats.iter().all(|&f| f == 1),
        Err(_) => false,
    };
    let strips = decoder.get_chunk_type() == tiff::decoder::ChunkType::Strip;
    if !(photometric_ok && planar_ok && unsigned && strips) {
        return None;
    }
    Some(decode_tiff_16_strips(
        decoder, channels, grey, input, limits, format,
    ))
}

fn decode_tiff_16_strips(
    mut decoder: TiffDecoder<'_>,
    channels: usize,
    grey: bool,
    input: &[u8],
    limits: &Limits,
    format: ImageFormat,
) -> Result<Decoded, ImagingError> {
    let error = |e: tiff::TiffError| decode_error(format, e);
    let (width, height) = decoder.dimensions().map_err(error)?;
    check_pixels(format, width, height, limits)?;
    let (orientation, profile) = tiff_orientation_and_profile(&mut decoder);
    let row = width as usize * channels;
    let mut pixels = vec![0u8; row * height as usize];
    let rows_per_strip = decoder.chunk_dimensions().1 as usize;
    let strips = decoder.strip_count().map_err(error)?;
    if (strips as usize).saturating_mul(rows_per_strip) < height as usize {
        return Err(decode_error(
            format,
            "its strips do not cover the image's rows",
        ));
    }
    for strip in 0..strips {
        let first = strip as usize * rows_per_strip;
        if first >= height as usize {
            break;
        }
        let out = &mut pixels[first * row..];
        let tiff::decoder::DecodingResult::U16(samples) =
            decoder.read_chunk(strip).map_err(error)?
        else {
            return Err(decode_error(format, "a strip whose samples are not 16-bit"));
        };
        let rows = rows_per_strip.min(height as usize - first);
        if samples.len() < rows * row {
            return Err(decode_error(
                format,
                "a strip holds fewer samples than its rows",
            ));
        }
        // Same rounding as the image crate's: round(v * 255 / 65535).
        for (to, from) in out.iter_mut().zip(&samples[..rows * row]) {
            *to = ((u32::from(*from) + 128) / 257) as u8;
        }
    }
    let (w, h) = (width, height);
    let wrong_size = || decode_error(format, "decoded buffer has the wrong size");
    let img = match channels {
        1 => image::GrayImage::from_raw(w, h, pixels).map(DynamicImage::ImageLuma8),
        2 => image::GrayAlphaImage::from_raw(w, h, pixels).map(DynamicImage::ImageLumaA8),
        3 => image::RgbImage::from_raw(w, h, pixels).map(DynamicImage::ImageRgb8),
        _ => image::RgbaImage::from_raw(w, h, pixels).map(DynamicImage::ImageRgba8),
    }
    .ok_or_else(wrong_size)?;
    let img = if img.color().has_alpha() && tiff_alpha_is_associated(input) {
        DynamicImage::ImageRgba8(unpremultiply(img.into_rgba8()))
    } else {
        img
    };
    let space = if grey { "b-w" } else { "srgb" };
    let meta = SourceMeta::still(format, (width, height), orientation, space);
    Ok(still_decoded(img, profile, meta))
}

/// Whether a TIFF's alpha is associated (its colours premultiplied by it,
/// `ExtraSamples` = 1), which the image crate does not look at.
fn tiff_alpha_is_associated(input: &[u8]) -> bool {
    let Ok(mut decoder) = tiff::decoder::Decoder::new(Cursor::new(input)) else {
        return false;
    };
    matches!(
        decoder.find_tag_unsigned_vec::<u16>(tiff::tags::Tag::ExtraSamples),
        Ok(Some(extra)) if extra.first() == Some(&1)
    )
}

/// Colours divided by their alpha again (a clear pixel stays as it is).
fn unpremultiply(mut rgba: image::RgbaImage) -> image::RgbaImage {
    for p in rgba.pixels_mut() {
        let a = u32::from(p[3]);
        if a == 0 || a == 255 {
            continue;
        }
        for c in 0..3 {
            p[c] = ((u32::from(p[c]) * 255 + a / 2) / a).min(255) as u8;
        }
    }
    rgba
}

/// How many frames a GIF has, up to `cap`, read from their descriptors
/// without decoding them; a damaged frame ends the count (the decoder
/// reports it).
fn gif_frame_count(input: &[u8], cap: usize) -> usize {
    let mut options = gif::DecodeOptions::new();
    options.skip_frame_decoding(true);
    options.check_frame_consistency(false);
    let Ok(mut decoder) = options.read_info(input) else {
        return 0;
    };
    let mut count = 0;
    while count < cap && matches!(decoder.next_frame_info(), Ok(Some(_))) {
        count += 1;
    }
    count
}

/// How often a GIF plays, from the loop extension before its first frame
/// (read up to that frame's descriptor, not its pixels). `image`'s decoder
/// reports a GIF without the extension, which plays once, as looping.
fn gif_repeat(input: &[u8]) -> Repeat {
    let Ok(mut decoder) = gif::DecodeOptions::new().read_info(input) else {
        return Repeat::Infinite;
    };
    if decoder.next_frame_info().is_err() {
        return Repeat::Infinite;
    }
    match decoder.repeat() {
        gif::Repeat::Finite(n) => Repeat::Finite(n),
        gif::Repeat::Infinite => Repeat::Infinite,
    }
}

/// A progressive JPEG with only its DC scans (first and refinement), then one
/// empty AC scan per component, ended with EOI; `None` when the file is not
/// progressive or its markers do not parse, in which case the caller decodes
/// the original.
///
/// The empty AC scans mark every AC coefficient as known (zero): with AC
/// data missing, libjpeg-turbo would otherwise run its inter-block smoothing,
/// which estimates AC terms that a 1/8-scale decode never uses.
fn dc_scans_only(jpeg: &[u8]) -> Option<Vec<u8>> {
    if jpeg.get(..2)? != [0xff, 0xd8] {
        return None;
    }
    let mut out = Vec::with_capacity(jpeg.len() / 8);
    out.extend_from_slice(&jpeg[..2]);
    let mut frame: Option<JpegFrame> = None;
    let mut i = 2;
    loop {
        let (marker, start, segment_end) = super::jpeg_dc::segment(jpeg, i)?;
        if marker == 0xd9 {
            break;
        }
        let segment = &jpeg[start..segment_end];
        match marker {
            0xc2 => frame = Some(JpegFrame::parse(segment)?),
            0xc0 | 0xc1 | 0xc3 | 0xc5..=0xc7 | 0xc9..=0xcb | 0xcd..=0xcf => return None,
            _ => {}
        }
        if marker != 0xda {
            out.extend_from_slice(segment);
            i = segment_end;
            continue;
        }
        let spectral_start = super::jpeg_dc::scan_header(&segment[4..])?.spectral_start;
        let end = super::jpeg_dc::scan_end(jpeg, segment_end)?;
        if spectral_start == 0 {
            out.extend_from_slice(&jpeg[start..end]);
        }
        i = end;
    }
    frame?.write_empty_ac_scans(&mut out);
    out.extend_from_slice(&[0xff, 0xd9]);
    Some(out)
}

/// What a progressive frame header says about block counts.
struct JpegFrame {
    width: u32,
    height: u32,
    /// (component id, horizontal, vertical sampling factor)
    components: Vec<(u8, u32, u32)>,
}

impl JpegFrame {
    fn parse(sof: &[u8]) -> Option<JpegFrame> {
        let height = u16::from_be_bytes([*sof.get(5)?, *sof.get(6)?]) as u32;
        let width = u16::from_be_bytes([*sof.get(7)?, *sof.get(8)?]) as u32;
        let count = *sof.get(9)? as usize;
        let components = (0..count)
            .map(|c| {
                let at = 10 + 3 * c;
                let sampling = *sof.get(at + 1)?;
                Some((
                    *sof.get(at)?,
                    (sampling >> 4) as u32,
                    (sampling & 15) as u32,
                ))
            })
            .collect::<Option<Vec<_>>>()?;
        let valid = width > 0
            && height > 0
            && !components.is_empty()
            && components
                .iter()
                .all(|&(_, h, v)| (1..=4).contains(&h) && (1..=4).contains(&v));
        valid.then_some(JpegFrame {
            width,
            height,
            components,
        })
    }

    /// Appends a Huffman table of end-of-band runs and, per component, an AC
    /// scan (bands 1-63, full precision) in which every block is empty.
    fn write_empty_ac_scans(&self, out: &mut Vec<u8>) {
        // No restart markers in these scans, whatever interval the file set.
        out.extend_from_slice(&[0xff, 0xdd, 0x00, 4, 0, 0]);
        // AC table 3: the 15 symbols EOB0..EOB14 (0x00, 0x10, .. 0xe0), all
        // 4-bit codes, so symbol r has code r.
        out.extend_from_slice(&[0xff, 0xc4, 0x00, 34, 0x13]);
        let mut counts = [0u8; 16];
        counts[3] = 15;
        out.extend_from_slice(&counts);
        out.extend((0..15u8).map(|r| r << 4));
        let h_max = self.components.iter().map(|c| c.1).max().unwrap_or(1);
        let v_max = self.components.iter().map(|c| c.2).max().unwrap_or(1);
        for &(id, h, v) in &self.components {
            let cols = (self.width * h).div_ceil(h_max).div_ceil(8);
            let rows = (self.height * v).div_ceil(v_max).div_ceil(8);
            out.extend_from_slice(&[0xff, 0xda, 0x00, 8, 1, id, 0x03, 1, 63, 0x00]);
            let mut bits = BitWriter::default();
            let mut blocks = cols * rows;
            while blocks > 0 {
                // EOBn covers 2^r + (r extra bits) blocks, at most 32767.
                let run = blocks.min(32767);
                let r = 31 - run.leading_zeros();
                bits.put(r, 4);
                bits.put(run - (1 << r), r);
                blocks -= run;
            }
            bits.finish(out);
        }
    }
}

/// Packs bits most-significant first, with JPEG's 0xff byte stuffing.
#[derive(Default)]
struct BitWriter {
    acc: u32,
    len: u32,
    bytes: Vec<u8>,
}

impl BitWriter {
    fn put(&mut self, value: u32, count: u32) {
        for i in (0..count).rev() {
            self.acc = (self.acc << 1) | ((value >> i) & 1);
            self.len += 1;
            if self.len == 8 {
                self.push();
            }
        }
    }

    fn push(&mut self) {
        let byte = self.acc as u8;
        self.bytes.push(byte);
        if byte == 0xff {
            self.bytes.push(0x00);
        }
        self.acc = 0;
        self.len = 0;
    }

    /// Pads the last byte with 1 bits and appends the data.
    fn finish(mut self, out: &mut Vec<u8>) {
        if self.len > 0 {
            let pad = 8 - self.len;
            self.put((1 << pad) - 1, pad);
        }
        out.extend_from_slice(&self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use turbojpeg::{PixelFormat, raw};

    /// Every DC bit: libjpeg-turbo's pixels.
    const EXACT: crate::imaging::jpeg_dc::Precision = crate::imaging::jpeg_dc::Precision(0);

    fn decode_eighth(jpeg: &[u8]) -> Vec<u8> {
        decode_scaled(jpeg, 8)
    }

    /// Our DC decoder, given the frame size libjpeg-turbo reads (none for a
    /// file it cannot read).
    fn dc_eighth(
        jpeg: &[u8],
        precision: crate::imaging::jpeg_dc::Precision,
    ) -> Option<crate::imaging::jpeg_dc::Eighth> {
        let frame = turbojpeg::read_header(jpeg)
            .map(|h| (h.width as u32, h.height as u32))
            .unwrap_or((0, 0));
        crate::imaging::jpeg_dc::decode_eighth(jpeg, precision, frame)
    }

    /// libjpeg-turbo's RGB decode of `jpeg` at 1/`denom` scale.
    fn decode_scaled(jpeg: &[u8], denom: usize) -> Vec<u8> {
        let mut d = Decompressor::new().unwrap();
        let factor = ScalingFactor::new(1, denom);
        d.set_scaling_factor(factor).unwrap();
        let h = d.read_header(jpeg).unwrap().scaled(factor);
        let mut px = vec![0u8; h.width * h.height * 3];
        d.decompress(
            jpeg,
            turbojpeg::Image {
                pixels: &mut px[..],
                width: h.width,
                pitch: h.width * 3,
                height: h.height,
                format: PixelFormat::RGB,
            },
        )
        .unwrap();
        px
    }

    #[test]
    fn dc_scans_alone_give_the_same_eighth_scale_image() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/images/wood.jpg");
        let jpeg = std::fs::read(path).unwrap();
        assert!(turbojpeg::read_header(&jpeg).unwrap().is_progressive);
        let trimmed = dc_scans_only(&jpeg).expect("progressive");
        assert!(
            trimmed.len() < jpeg.len(),
            "{} of {}",
            trimmed.len(),
            jpeg.len()
        );
        let (full, dc) = (decode_eighth(&jpeg), decode_eighth(&trimmed));
        assert_eq!(full.len(), dc.len());
        // Luma is exact; 4:2:0 chroma is decoded with a 2x2 IDCT at this
        // scale and loses its in-block gradient, which costs little.
        let mse = full
            .iter()
            .zip(&dc)
            .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
            .sum::<f64>()
            / full.len() as f64;
        let psnr = 10.0 * (255.0f64 * 255.0 / mse.max(1e-9)).log10();
        assert!(psnr >= 40.0, "PSNR {psnr:.1} dB");
    }

    /// Re-encodes a corpus photo as a progressive JPEG with libjpeg-turbo:
    /// `subsamp` one of TurboJPEG's TJSAMP values, `restart` blocks between
    /// restart markers (0 for none).
    fn progressive(name: &str, subsamp: u32, restart: i32) -> Vec<u8> {
        progressive_scaled(name, 1, subsamp, restart)
    }

    /// As [`progressive`], the photo first enlarged `scale` times.
    fn progressive_scaled(name: &str, scale: u32, subsamp: u32, restart: i32) -> Vec<u8> {
        encode_progressive(name, scale, 85, subsamp, restart)
    }

    /// As [`progressive_scaled`], at JPEG quality `quality`.
    fn encode_progressive(
        name: &str,
        scale: u32,
        quality: i32,
        subsamp: u32,
        restart: i32,
    ) -> Vec<u8> {
        encode_jpeg(name, scale, quality, subsamp, restart, true)
    }

    /// As [`progressive_scaled`], but a baseline (sequential) JPEG.
    fn baseline(name: &str, scale: u32, subsamp: u32, restart: i32) -> Vec<u8> {
        encode_jpeg(name, scale, 85, subsamp, restart, false)
    }

    /// A corpus photo enlarged `scale` times and encoded by libjpeg-turbo,
    /// progressive or baseline.
    fn encode_jpeg(
        name: &str,
        scale: u32,
        quality: i32,
        subsamp: u32,
        restart: i32,
        progressive: bool,
    ) -> Vec<u8> {
        let path = format!("{}/fixtures/images/{name}", env!("CARGO_MANIFEST_DIR"));
        let img = image::open(path).unwrap().to_rgb8();
        let (w, h) = img.dimensions();
        let img = image::imageops::resize(
            &img,
            w * scale,
            h * scale,
            image::imageops::FilterType::Triangle,
        );
        let gray = subsamp == raw::TJSAMP_TJSAMP_GRAY as u32;
        let pixels = if gray {
            image::DynamicImage::ImageRgb8(img.clone())
                .to_luma8()
                .into_raw()
        } else {
            img.as_raw().clone()
        };
        let (w, h) = img.dimensions();
        // SAFETY: test-only FFI; the handle and buffers are valid for each
        // call, and the output buffer is copied before it is freed.
        unsafe {
            let handle = raw::tj3Init(raw::TJINIT_TJINIT_COMPRESS as i32);
            assert!(!handle.is_null());
            for (param, value) in [
                (raw::TJPARAM_TJPARAM_QUALITY, quality),
                (raw::TJPARAM_TJPARAM_SUBSAMP, subsamp as i32),
                (raw::TJPARAM_TJPARAM_PROGRESSIVE, i32::from(progressive)),
                (raw::TJPARAM_TJPARAM_RESTARTBLOCKS, restart),
            ] {
                assert_eq!(raw::tj3Set(handle, param as i32, value), 0);
            }
            let (format, channels) = if gray {
                (raw::TJPF_TJPF_GRAY, 1)
            } else {
                (raw::TJPF_TJPF_RGB, 3)
            };
            let mut out: *mut u8 = std::ptr::null_mut();
            let mut size: raw::size_t = 0;
            let status = raw::tj3Compress8(
                handle,
                pixels.as_ptr(),
                w as i32,
                (w * channels) as i32,
                h as i32,
                format,
                &mut out,
                &mut size,
            );
            assert_eq!(status, 0);
            let jpeg = std::slice::from_raw_parts(out, size as usize).to_vec();
            raw::tj3Free(out.cast());
            raw::tj3Destroy(handle);
            jpeg
        }
    }

    /// (component ids, spectral start and end, successive approximation high
    /// and low bit) of each scan of `jpeg`.
    fn scans(jpeg: &[u8]) -> Vec<(Vec<u8>, u8, u8, u8, u8)> {
        let mut found = Vec::new();
        let mut i = 2;
        loop {
            let (marker, start, end) = crate::imaging::jpeg_dc::segment(jpeg, i).unwrap();
            if marker == 0xd9 {
                return found;
            }
            i = end;
            if marker == 0xda {
                let h = crate::imaging::jpeg_dc::scan_header(&jpeg[start + 4..end]).unwrap();
                let ids = h.components.iter().map(|c| c.0).collect();
                found.push((
                    ids,
                    h.spectral_start,
                    h.spectral_end,
                    h.approx >> 4,
                    h.approx & 15,
                ));
                i = crate::imaging::jpeg_dc::scan_end(jpeg, end).unwrap();
            }
        }
    }

    #[test]
    fn a_quarter_scale_decode_spares_the_last_luma_refinement_at_quality_100() {
        use crate::imaging::jpeg_refine::without_spare_refinements;
        for (subsamp, restart) in [
            (raw::TJSAMP_TJSAMP_420, 0),
            (raw::TJSAMP_TJSAMP_444, 0),
            (raw::TJSAMP_TJSAMP_GRAY, 0),
            (raw::TJSAMP_TJSAMP_420, 4),
        ] {
            let case = format!("subsampling {subsamp}, restart {restart}");
            let jpeg = encode_progressive("wood.jpg", 1, 100, subsamp as u32, restart);
            let spared = without_spare_refinements(&jpeg, 4)
                .unwrap_or_else(|| panic!("{case}: nothing spared"));
            // Exactly the luma's AC refinements to the last bit are gone:
            // first scans, DC scans and chroma scans all stay.
            let luma = scans(&jpeg)[0].0[0];
            let mut expected = scans(&jpeg);
            expected.retain(|(ids, ss, _, ah, _)| !(ids == &[luma] && *ss > 0 && *ah == 1));
            assert!(expected.len() < scans(&jpeg).len(), "{case}");
            assert_eq!(scans(&spared), expected, "{case}");
            let (whole, quick) = (decode_scaled(&jpeg, 4), decode_scaled(&spared, 4));
            assert_eq!(whole.len(), quick.len(), "{case}");
            let max = whole.iter().zip(&quick).map(|(a, b)| a.abs_diff(*b)).max();
            // 1.5 levels from the bound, rounding in the IDCT and colour.
            assert!(max <= Some(2), "{case}: largest difference {max:?}");
            assert!(whole != quick, "{case}: the spared bits changed nothing");
            // Half scale and full scale need every bit.
            for denom in [1, 2] {
                assert!(
                    without_spare_refinements(&jpeg, denom).is_none(),
                    "{case}: 1/{denom}"
                );
            }
        }
        // Coarser quantisers need every bit at any scale.
        let jpeg = encode_progressive("wood.jpg", 1, 95, raw::TJSAMP_TJSAMP_420 as u32, 0);
        for denom in [2, 4] {
            assert!(without_spare_refinements(&jpeg, denom).is_none());
        }
    }

    #[test]
    fn a_narrow_crop_of_a_progressive_file_is_decoded_by_our_decoder_exactly() {
        let jpeg = crate::imaging::tests::fixture("wood-progressive-1280.jpg");
        // Our decoder takes this file, and a 200-wide crop is narrow enough.
        assert!(crate::imaging::jpeg_progressive::decode(&jpeg, 1 << 20).is_some());
        let limits = Limits::default();
        for action in [
            "crop:w_200",
            "crop:l_333,t_17,w_101,h_203",
            "crop:w_300,h_100,g_9",
        ] {
            let ours = crate::imaging::process(
                &jpeg,
                &crate::action::Action::parse(&format!("{action}|format:t_png")).unwrap(),
                &limits,
                &crate::imaging::NoWatermarks,
            );
            // `rotate:a_0` first: libjpeg-turbo decodes it all, then the crop.
            let theirs = crate::imaging::process(
                &jpeg,
                &crate::action::Action::parse(&format!("rotate:a_0|{action}|format:t_png"))
                    .unwrap(),
                &limits,
                &crate::imaging::NoWatermarks,
            );
            let (ours, theirs) = (ours.unwrap().image.unwrap(), theirs.unwrap().image.unwrap());
            assert!(ours.bytes == theirs.bytes, "{action}: pixels differ");
        }
    }

    #[test]
    fn a_thumbnail_of_a_quality_100_progressive_file_takes_the_spared_path() {
        // 1280x960: a 300-wide thumbnail shrinks it on load by 4.
        let jpeg = encode_progressive(
            "wood-progressive-1280.jpg",
            1,
            100,
            raw::TJSAMP_TJSAMP_420 as u32,
            0,
        );
        let spared = crate::imaging::jpeg_refine::without_spare_refinements(&jpeg, 4).unwrap();
        let action = crate::action::Action::parse("resize:w_300").unwrap();
        let (_, lead) = crate::imaging::geometry::lead(&action);
        let decoded = decode(&jpeg, &Limits::default(), lead).unwrap();
        let Pixels::Still(img) = decoded.pixels else {
            panic!("still image")
        };
        assert_eq!((img.width(), img.height()), (320, 240));
        // The pixels are those of the spared file, not the whole one.
        let ours = img.to_rgb8();
        assert_eq!(ours.as_raw(), &decode_scaled(&spared, 4));
        let whole = decode_scaled(&jpeg, 4);
        assert_ne!(ours.as_raw(), &whole);
        let max = ours
            .as_raw()
            .iter()
            .zip(&whole)
            .map(|(a, b)| a.abs_diff(*b))
            .max();
        assert!(max <= Some(2), "largest difference {max:?}");
    }

    #[test]
    fn damaged_quality_100_progressive_files_fail_cleanly_at_quarter_scale() {
        // 1280x960, shrunk on load by 4 for a 300-wide thumbnail.
        let jpeg = encode_progressive("wood.jpg", 2, 100, raw::TJSAMP_TJSAMP_420 as u32, 0);
        assert!(crate::imaging::jpeg_refine::without_spare_refinements(&jpeg, 4).is_some());
        let action = crate::action::Action::parse("resize:w_300").unwrap();
        let (_, lead) = crate::imaging::geometry::lead(&action);
        let limits = Limits::default();
        let step = jpeg.len() / 97;
        for at in (2..jpeg.len()).step_by(step) {
            // Cut short, or one byte flipped: no panic, an image or an error.
            let mut flipped = jpeg.clone();
            flipped[at] ^= 0xff;
            for bad in [&jpeg[..at], &flipped[..]] {
                if let Some(out) = crate::imaging::jpeg_refine::without_spare_refinements(bad, 4) {
                    assert!(out.len() < bad.len());
                }
                let _ = decode(bad, &limits, lead);
            }
        }
    }

    /// Our DC decoder's image against libjpeg-turbo's eighth-scale decode of
    /// the same DC data (the file without its AC scans): (largest channel
    /// difference, PSNR against libjpeg-turbo's decode of the whole file,
    /// which also uses the AC terms of subsampled chroma).
    fn compare_dc_decoder(jpeg: &[u8]) -> (u8, f64) {
        let ours = dc_eighth(jpeg, EXACT).expect("decodes");
        let same_data = decode_eighth(&dc_scans_only(jpeg).expect("progressive"));
        let whole = decode_eighth(jpeg);
        assert_eq!(ours.rgb.len(), whole.len());
        let max = ours
            .rgb
            .iter()
            .zip(&same_data)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        let mse = ours
            .rgb
            .iter()
            .zip(&whole)
            .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
            .sum::<f64>()
            / whole.len() as f64;
        (max, 10.0 * (255.0f64 * 255.0 / mse.max(1e-9)).log10())
    }

    /// storm.jpg encoded by `encode(subsampling, restart interval)` in each
    /// of TurboJPEG's subsamplings, with and without restart markers, each
    /// with its name.
    fn storm_in_every_subsampling(encode: impl Fn(u32, i32) -> Vec<u8>) -> Vec<(String, Vec<u8>)> {
        let mut cases = Vec::new();
        for (subsamp, name) in [
            (raw::TJSAMP_TJSAMP_420, "4:2:0"),
            (raw::TJSAMP_TJSAMP_444, "4:4:4"),
            (raw::TJSAMP_TJSAMP_422, "4:2:2"),
            (raw::TJSAMP_TJSAMP_440, "4:4:0"),
            (raw::TJSAMP_TJSAMP_411, "4:1:1"),
            (raw::TJSAMP_TJSAMP_GRAY, "grey"),
        ] {
            for restart in [0, 7] {
                cases.push((
                    format!("storm.jpg {name}, restart {restart}"),
                    encode(subsamp as u32, restart),
                ));
            }
        }
        cases
    }

    #[test]
    fn dc_decoder_matches_libjpeg_turbo() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/images/wood.jpg");
        let wood = std::fs::read(path).unwrap();
        let mut cases = vec![("wood.jpg as stored".to_string(), wood)];
        cases.extend(storm_in_every_subsampling(|subsamp, restart| {
            progressive("storm.jpg", subsamp, restart)
        }));
        for (name, jpeg) in &cases {
            let (max, psnr) = compare_dc_decoder(jpeg);
            assert_eq!(max, 0, "{name}: differs by {max} from libjpeg-turbo");
            assert!(
                psnr >= 38.0,
                "{name}: PSNR {psnr:.1} dB against the full decode"
            );
        }
    }

    #[test]
    fn dc_decoder_reads_baseline_files_as_libjpeg_turbo_does() {
        // A sequential file's scans carry every coefficient: ours reads DC
        // and skips AC, and gives libjpeg-turbo's eighth-scale pixels
        // exactly. 4:2:0 chroma, which libjpeg-turbo decodes with a 2x2
        // IDCT at this scale, is declined.
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/images");
        let mut cases = Vec::new();
        for name in ["storm.jpg", "storm-gray.jpg", "orientation-1.jpg"] {
            let jpeg = std::fs::read(format!("{dir}/{name}")).unwrap();
            assert!(!turbojpeg::read_header(&jpeg).unwrap().is_progressive);
            cases.push((format!("{name} as stored"), jpeg));
        }
        cases.extend(storm_in_every_subsampling(|subsamp, restart| {
            baseline("storm.jpg", 1, subsamp, restart)
        }));
        let mut decoded = 0;
        for (name, jpeg) in &cases {
            let h = turbojpeg::read_header(jpeg).unwrap();
            let Some(ours) = dc_eighth(jpeg, EXACT) else {
                assert_eq!(h.subsamp, turbojpeg::Subsamp::Sub2x2, "{name}: declined");
                continue;
            };
            assert_ne!(
                h.subsamp,
                turbojpeg::Subsamp::Sub2x2,
                "{name}: not declined"
            );
            let theirs = decode_eighth(jpeg);
            assert_eq!(ours.rgb.len(), theirs.len(), "{name}");
            let max = ours
                .rgb
                .iter()
                .zip(&theirs)
                .map(|(a, b)| a.abs_diff(*b))
                .max();
            assert_eq!(max, Some(0), "{name}: differs from libjpeg-turbo");
            decoded += 1;
        }
        // All but the four 4:2:0 files (storm.jpg and orientation-1.jpg as
        // stored, and the two encoded).
        assert_eq!(decoded, cases.len() - 4);
    }

    #[test]
    fn damaged_baseline_thumbnails_decode_or_fail_cleanly() {
        // Our decoder reads baseline thumbnails too: cut short, a byte
        // flipped or a marker dropped in anywhere, the file gives a 40-wide
        // image or an error that names the input, never a panic.
        let action = crate::action::Action::parse("resize:w_40|format:t_jpeg,q_85").unwrap();
        let limits = crate::imaging::Limits::default();
        for restart in [0, 5] {
            let jpeg = baseline("storm.jpg", 2, raw::TJSAMP_TJSAMP_422 as u32, restart);
            assert!(dc_eighth(&jpeg, EXACT).is_some());
            let (mut images, mut errors) = (0, 0);
            for_each_damaged(&jpeg, |at, bad| {
                if thumbnail_or_clean_error(bad, &action, &limits, at) {
                    images += 1;
                } else {
                    errors += 1;
                }
            });
            // Both outcomes occur: the sweep reaches past the headers.
            assert!(
                images > 10 && errors > 10,
                "{images} images, {errors} errors"
            );
        }
    }

    #[test]
    fn dc_decoder_stops_reading_once_dc_is_complete() {
        let jpeg = progressive("storm.jpg", raw::TJSAMP_TJSAMP_420 as u32, 0);
        // The end of the scan that brings DC to full precision (Ss 0, Al 0).
        let mut end = None;
        for p in 0..jpeg.len() - 8 {
            if jpeg[p..p + 2] != [0xff, 0xda] {
                continue;
            }
            let ns = jpeg[p + 4] as usize;
            let (ss, al) = (jpeg[p + 5 + 2 * ns], jpeg[p + 7 + 2 * ns] & 15);
            if ss == 0 && al == 0 {
                let data = p + 2 + u16::from_be_bytes([jpeg[p + 2], jpeg[p + 3]]) as usize;
                end = (data..jpeg.len() - 1).find(|&q| {
                    jpeg[q] == 0xff && jpeg[q + 1] != 0 && !(0xd0..=0xd7).contains(&jpeg[q + 1])
                });
            }
        }
        let end = end.expect("a full-precision DC scan");
        assert!(end < jpeg.len() * 3 / 4, "{end} of {}", jpeg.len());
        // Keep the next marker, which ends the scan's data; drop its segment.
        let mut cut = jpeg[..end + 2].to_vec();
        cut.extend_from_slice(b"not JPEG from here on");
        let whole = dc_eighth(&jpeg, EXACT).unwrap();
        let early = dc_eighth(&cut, EXACT).expect("stops at the AC scan");
        assert_eq!(whole.rgb, early.rgb);
    }

    /// The end of the first scan's entropy-coded data.
    fn first_scan_end(jpeg: &[u8]) -> usize {
        let sos = jpeg.windows(2).position(|w| w == [0xff, 0xda]).unwrap();
        let data = sos + 2 + u16::from_be_bytes([jpeg[sos + 2], jpeg[sos + 3]]) as usize;
        (data..jpeg.len() - 1)
            .find(|&q| jpeg[q] == 0xff && jpeg[q + 1] != 0 && !(0xd0..=0xd7).contains(&jpeg[q + 1]))
            .unwrap()
    }

    #[test]
    fn half_level_precision_skips_a_fine_dc_refinement() {
        use crate::imaging::jpeg_dc::Precision;
        let ours = dc_eighth;
        // Quality 85: DC quantisers of 5, one bit left for the refinement
        // scan, worth 5/16 of a level with its midpoint taken.
        let jpeg = progressive("storm.jpg", raw::TJSAMP_TJSAMP_420 as u32, 0);
        let end = first_scan_end(&jpeg);
        assert!(end < jpeg.len() / 4, "{end} of {}", jpeg.len());
        let mut cut = jpeg[..end + 2].to_vec();
        cut.extend_from_slice(b"not JPEG from here on");
        let exact = ours(&jpeg, EXACT).unwrap();
        assert!(ours(&cut, EXACT).is_none(), "exact needs the refinement");
        let early = ours(&cut, Precision::HALF_LEVEL).expect("stops after the first scan");
        assert_eq!(early.rgb, ours(&jpeg, Precision::HALF_LEVEL).unwrap().rgb);
        let diffs: Vec<u8> = exact
            .rgb
            .iter()
            .zip(&early.rgb)
            .map(|(a, b)| a.abs_diff(*b))
            .collect();
        let max = *diffs.iter().max().unwrap();
        let changed = diffs.iter().filter(|&&d| d > 0).count() as f64 / diffs.len() as f64;
        let mse = diffs.iter().map(|&d| f64::from(d).powi(2)).sum::<f64>() / diffs.len() as f64;
        let psnr = 10.0 * (255.0f64 * 255.0 / mse.max(1e-9)).log10();
        // Samples differ by at most one level, so RGB by at most three after
        // colour conversion; most are unchanged (48 dB here, where the JPEG
        // re-encode of a thumbnail costs about 40).
        assert!(
            max <= 3 && psnr >= 45.0,
            "max {max}, {changed:.3} changed, PSNR {psnr:.1} dB"
        );

        // Quality 50: quantisers of 16 make the last bit worth a level, so
        // the decoder waits for it and matches the exact decode.
        let coarse = encode_progressive("storm.jpg", 1, 50, raw::TJSAMP_TJSAMP_420 as u32, 0);
        let end = first_scan_end(&coarse);
        let mut cut = coarse[..end + 2].to_vec();
        cut.extend_from_slice(b"not JPEG from here on");
        assert!(ours(&cut, Precision::HALF_LEVEL).is_none());
        assert_eq!(
            ours(&coarse, Precision::HALF_LEVEL).unwrap().rgb,
            ours(&coarse, EXACT).unwrap().rgb
        );
    }

    /// A reader that hands out at most `step` bytes per call, so that
    /// markers and stuffed bytes fall across reads.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl std::io::Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.step.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    fn read_source(jpeg: &[u8], action: &str, step: usize) -> Vec<u8> {
        let action = crate::action::Action::parse(action).unwrap();
        let mut body = Trickle { data: jpeg, step };
        let limits = crate::imaging::Limits::default();
        crate::imaging::read_source(&mut body, jpeg.len() as u64, &action, &limits).unwrap()
    }

    #[test]
    fn thumbnails_read_only_the_dc_scans_and_come_out_the_same() {
        let jpeg = progressive_scaled("storm.jpg", 4, raw::TJSAMP_TJSAMP_420 as u32, 5);
        assert!(jpeg.len() > 128 << 10, "{}", jpeg.len());
        let action = "resize:w_200|format:t_jpeg,q_85";
        let cut = read_source(&jpeg, action, 1 << 20);
        // At quality 85 the DC refinement is not worth waiting for: the cut
        // is the headers and the first scan, which ends with restart
        // markers here (every 5 blocks).
        let first_end = first_scan_end(&jpeg);
        assert!(first_end < jpeg.len() / 4, "{first_end} of {}", jpeg.len());
        assert_eq!(cut.len(), first_end + 2);
        assert_eq!(cut[..first_end], jpeg[..first_end]);
        // Reads of any size keep the same bytes.
        for step in [1, 7, 4096] {
            assert!(read_source(&jpeg, action, step) == cut, "reads of {step}");
        }
        let limits = crate::imaging::Limits::default();
        let parsed = crate::action::Action::parse(action).unwrap();
        let from_cut =
            crate::imaging::process(&cut, &parsed, &limits, &crate::imaging::NoWatermarks);
        let from_all =
            crate::imaging::process(&jpeg, &parsed, &limits, &crate::imaging::NoWatermarks);
        let (from_cut, from_all) = (
            from_cut.unwrap().image.unwrap(),
            from_all.unwrap().image.unwrap(),
        );
        assert_eq!((from_cut.width, from_cut.height), (200, 133));
        assert!(from_cut.bytes == from_all.bytes, "outputs differ");
        // A quarter turn first: the resize moves before it, so the file is
        // still shrunk on load and read to its DC scans only.
        let turned = "rotate:a_90|resize:h_200|format:t_jpeg,q_85";
        assert!(read_source(&jpeg, turned, 1 << 20) == cut);
        let parsed = crate::action::Action::parse(turned).unwrap();
        let run = |input: &[u8]| {
            let out =
                crate::imaging::process(input, &parsed, &limits, &crate::imaging::NoWatermarks);
            out.unwrap().image.unwrap()
        };
        let (out, whole) = (run(&cut), run(&jpeg));
        assert_eq!((out.width, out.height), (133, 200));
        // Shrunk on load from the whole file too: the same bytes.
        assert!(out.bytes == whole.bytes, "outputs differ");
    }

    /// Calls `check` with damaged copies of `jpeg` at about a hundred
    /// places `at`: cut short there, with that byte flipped, and with a
    /// marker dropped in there.
    fn for_each_damaged(jpeg: &[u8], mut check: impl FnMut(usize, &[u8])) {
        for at in (2..jpeg.len()).step_by(jpeg.len() / 101) {
            let mut flipped = jpeg.to_vec();
            flipped[at] ^= 0x5a;
            let mut marked = jpeg.to_vec();
            marked.splice(at..at, [0xff, [0xda, 0xc4, 0xd9, 0xd0][at % 4]]);
            for bad in [&jpeg[..at], &flipped[..], &marked[..]] {
                check(at, bad);
            }
        }
    }

    /// Processes a damaged file (damaged at `at`) with a 40-wide thumbnail
    /// action: true for a 40-wide image, false for an error that names the
    /// input; anything else fails the test.
    fn thumbnail_or_clean_error(
        input: &[u8],
        action: &crate::action::Action,
        limits: &crate::imaging::Limits,
        at: usize,
    ) -> bool {
        match crate::imaging::process(input, action, limits, &crate::imaging::NoWatermarks) {
            Ok(out) => {
                assert_eq!(out.image.map(|i| i.width), Some(40), "damage at {at}");
                true
            }
            Err(e) => {
                let code = e.code();
                assert!(
                    ["decode_failed", "not_an_image", "too_many_pixels"].contains(&code),
                    "damage at {at}: {code} {e}"
                );
                false
            }
        }
    }

    #[test]
    fn damaged_progressive_thumbnails_decode_or_fail_cleanly() {
        // The thumbnail path reads and decodes a progressive file with our own
        // code (the DC scans only): cut short, a byte flipped or a marker
        // dropped in anywhere, it gives a 40-wide image or an error that
        // names the input, never a panic.
        let action = "resize:w_40|format:t_jpeg,q_85";
        let parsed = crate::action::Action::parse(action).unwrap();
        let limits = crate::imaging::Limits::default();
        for restart in [0, 5] {
            let jpeg = progressive_scaled("storm.jpg", 4, raw::TJSAMP_TJSAMP_420 as u32, restart);
            let cut = read_source(&jpeg, action, 4096).len();
            assert!(cut < jpeg.len() / 2, "{cut} of {}", jpeg.len());
            let (mut images, mut errors) = (0, 0);
            for_each_damaged(&jpeg, |at, bad| {
                let mut body = Trickle {
                    data: bad,
                    step: 4096,
                };
                let Ok(input) =
                    crate::imaging::read_source(&mut body, bad.len() as u64, &parsed, &limits)
                else {
                    errors += 1;
                    return;
                };
                if thumbnail_or_clean_error(&input, &parsed, &limits, at) {
                    images += 1;
                } else {
                    errors += 1;
                }
            });
            // Both outcomes occur: the sweep reaches past the headers.
            assert!(
                images > 100 && errors > 10,
                "{images} images, {errors} errors"
            );
        }
    }

    #[test]
    fn other_sources_are_read_whole() {
        let progressive = progressive_scaled("storm.jpg", 4, raw::TJSAMP_TJSAMP_420 as u32, 0);
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/images");
        let baseline = std::fs::read(format!("{dir}/storm.jpg")).unwrap();
        let png = std::fs::read(format!("{dir}/goldfish-rgba.png")).unwrap();
        for (what, bytes, action) in [
            ("a shrink by 4", &progressive, "resize:w_400"),
            ("info", &progressive, "resize:w_200|info"),
            ("a crop first", &progressive, "crop:w_100|resize:w_10"),
            ("a baseline JPEG", &baseline, "resize:w_100"),
            ("a PNG", &png, "resize:w_100"),
        ] {
            assert!(read_source(bytes, action, 1 << 20) == *bytes, "{what}");
        }
    }

    /// libjpeg-turbo steps over a marker without a length between segments
    /// (here a restart marker after SOI). Our parsers used to read a length
    /// after it, so they could see segments libjpeg-turbo never read: below,
    /// a frame of 65535 x 65535 hidden in the bytes that length skips, past
    /// the file's end, for which the DC decoder allocated 800 MB (the pixel
    /// limit had passed libjpeg-turbo's frame). Such a file is now left to
    /// libjpeg-turbo, and our DC decoder refuses a frame whose size is not
    /// the one libjpeg-turbo read.
    #[test]
    fn a_marker_without_a_length_leaves_the_file_to_libjpeg_turbo() {
        let jpeg = progressive("storm.jpg", raw::TJSAMP_TJSAMP_420 as u32, 0);
        let mut evil = vec![0xff, 0xd8, 0xff, 0xd0];
        // An APP1 segment, whose marker read as a length is 0xffe1.
        evil.extend_from_slice(&[0xff, 0xe1, 0x00, 0x10]);
        evil.extend_from_slice(&[0; 14]);
        evil.extend_from_slice(&jpeg[2..]);
        let hidden_at = 4 + 0xffe1;
        assert!(evil.len() < hidden_at, "{}", evil.len());
        evil.resize(hidden_at, 0);
        // 65535 x 65535, three components sampled 4x4, then a DC table
        // (one code, "0", for a difference of size 0) and a DC scan.
        evil.extend_from_slice(&[0xff, 0xc2, 0x00, 0x11, 8, 0xff, 0xff, 0xff, 0xff, 3]);
        evil.extend_from_slice(&[1, 0x44, 0, 2, 0x44, 0, 3, 0x44, 0]);
        evil.extend_from_slice(&[0xff, 0xc4, 0x00, 0x14, 0x00, 1]);
        evil.extend_from_slice(&[0; 15]);
        evil.push(0);
        evil.extend_from_slice(&[0xff, 0xda, 0x00, 0x0c, 3, 1, 0, 2, 0, 3, 0, 0, 0, 0]);
        evil.extend_from_slice(&[0xff, 0xd9]);

        assert!(dc_eighth(&evil, EXACT).is_none());
        assert!(dc_scans_only(&evil).is_none());
        // libjpeg-turbo reads the file as it reads the photo.
        let header = turbojpeg::read_header(&evil).unwrap();
        assert_eq!((header.width, header.height), (480, 320));
        assert_eq!(decode_eighth(&evil), decode_eighth(&jpeg));
        // Through the pipeline: shrunk on load to 60 x 40, libjpeg-turbo's
        // eighth-scale pixels, read in full (no DC-only cut).
        let action = "resize:w_60|format:t_png";
        assert!(read_source(&evil, action, 4096) == evil);
        let limits = crate::imaging::Limits::default();
        let parsed = crate::action::Action::parse(action).unwrap();
        let out = crate::imaging::process(&evil, &parsed, &limits, &crate::imaging::NoWatermarks)
            .unwrap()
            .image
            .unwrap();
        let png = image::load_from_memory(&out.bytes).unwrap().to_rgb8();
        assert_eq!(png.dimensions(), (60, 40));
        assert!(png.into_raw() == decode_eighth(&jpeg), "pixels differ");

        // The same marker (TEM) after the first scan: the DC-only read keeps
        // it, and the cut decodes as libjpeg-turbo decodes the photo.
        let end = first_scan_end(&jpeg);
        let mut tem = jpeg[..end].to_vec();
        tem.extend_from_slice(&[0xff, 0x01]);
        tem.extend_from_slice(&jpeg[end..]);
        let (head, mut rest) = tem.split_at(16);
        let cut = crate::imaging::jpeg_dc::read_dc_scans(head.to_vec(), &mut rest, EXACT).unwrap();
        assert!(cut.len() < tem.len() && cut.windows(2).any(|w| w == [0xff, 0x01]));
        assert!(dc_eighth(&cut, EXACT).is_none());
        // libjpeg-turbo then judges the cut as it judges the file (it warns
        // of a marker where data should be, which fails the decode).
        let run = |input: &[u8]| {
            crate::imaging::process(input, &parsed, &limits, &crate::imaging::NoWatermarks)
                .map(|out| out.image.unwrap().bytes)
                .map_err(|e| e.to_string())
        };
        assert_eq!(run(&cut), run(&tem));

        // The frame libjpeg-turbo read, and no other, is decoded.
        let frame = (480, 320);
        let decode = crate::imaging::jpeg_dc::decode_eighth;
        assert!(decode(&jpeg, EXACT, frame).is_some());
        assert!(decode(&jpeg, EXACT, (488, 320)).is_none());
        assert!(decode(&jpeg, EXACT, (480, 321)).is_none());
    }

    /// The DC-only read is held to the input limit as a whole read is, for
    /// a stream whose size is not known (an S3 object sent without a
    /// length is announced as 0 bytes): a source found larger is refused.
    #[test]
    fn the_dc_only_read_stops_at_the_input_limit() {
        let jpeg = progressive_scaled("storm.jpg", 8, raw::TJSAMP_TJSAMP_420 as u32, 5);
        let end = first_scan_end(&jpeg);
        assert!(end > (64 << 10) + 4096, "{end}");
        let action = crate::action::Action::parse("resize:w_200|format:t_jpeg,q_85").unwrap();
        let read = |max_input_bytes: usize| {
            let mut body = Trickle {
                data: &jpeg,
                step: 4096,
            };
            let limits = crate::imaging::Limits {
                max_input_bytes,
                ..Default::default()
            };
            crate::imaging::read_source(&mut body, 0, &action, &limits)
        };
        let error = read(end - 2048).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::FileTooLarge);
        assert!(
            error
                .to_string()
                .contains(&format!("limit of {} bytes", end - 2048)),
            "{error}"
        );
        // Within the limit: the headers and the first scan, as before.
        assert_eq!(read(jpeg.len()).unwrap().len(), end + 2);
        // A limit meant as none at all does not overflow.
        assert_eq!(read(usize::MAX).unwrap().len(), end + 2);
    }

    #[test]
    fn dc_decoder_declines_what_it_does_not_cover() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/images");
        // Four components.
        let cmyk = std::fs::read(format!("{dir}/storm-cmyk.jpg")).unwrap();
        assert!(dc_eighth(&cmyk, EXACT).is_none());
        // Cut inside the first DC scan, with and without an end marker.
        let jpeg = progressive("storm.jpg", raw::TJSAMP_TJSAMP_420 as u32, 0);
        let sos = jpeg.windows(2).position(|w| w == [0xff, 0xda]).unwrap();
        let mut cut = jpeg[..sos + 200].to_vec();
        cut.extend_from_slice(&[0xff, 0xd9]);
        assert!(dc_eighth(&cut, EXACT).is_none());
        assert!(dc_eighth(&jpeg[..sos + 200], EXACT).is_none());
        // Garbage.
        assert!(dc_eighth(b"\xff\xd8\xff", EXACT).is_none());
        assert!(dc_eighth(b"", EXACT).is_none());
    }

    #[test]
    fn adobe_markers_are_found_past_markers_without_a_length() {
        let jpeg = std::fs::read(format!(
            "{}/fixtures/images/storm-cmyk.jpg",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        assert!(has_adobe_marker(&jpeg));
        // TEM and a restart marker before the first segment, which
        // libjpeg-turbo steps over.
        let mut tem = jpeg[..2].to_vec();
        tem.extend_from_slice(&[0xff, 0x01, 0xff, 0xd3]);
        tem.extend_from_slice(&jpeg[2..]);
        assert!(has_adobe_marker(&tem));
        // Without the segment: not inverted.
        let at = jpeg.windows(7).position(|w| &w[2..] == b"Adobe").unwrap() - 2;
        let len = usize::from(u16::from_be_bytes([jpeg[at + 2], jpeg[at + 3]]));
        let mut without = jpeg[..at].to_vec();
        without.extend_from_slice(&jpeg[at + 2 + len..]);
        assert!(!has_adobe_marker(&without));
        // Read the other way round, the colours turn to their negative.
        let decode = |bytes: &[u8]| {
            crate::imaging::process(
                bytes,
                &crate::action::Action::parse("format:t_png").unwrap(),
                &crate::imaging::Limits::default(),
                &crate::imaging::NoWatermarks,
            )
            .map(|out| {
                image::load_from_memory(&out.image.unwrap().bytes)
                    .unwrap()
                    .to_rgb8()
            })
        };
        let (with, plain) = (decode(&jpeg).unwrap(), decode(&without).unwrap());
        let (a, b) = (with.get_pixel(10, 10).0, plain.get_pixel(10, 10).0);
        assert!(
            a.iter().zip(b).any(|(x, y)| x.abs_diff(y) > 40),
            "{a:?} {b:?}"
        );
    }

    #[test]
    fn baseline_and_garbage_are_left_alone() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/images/storm.jpg");
        assert!(dc_scans_only(&std::fs::read(path).unwrap()).is_none());
        assert!(dc_scans_only(b"\xff\xd8\xff").is_none());
        assert!(dc_scans_only(b"").is_none());
    }

    /// `jpeg` with an APP2 segment holding a Display P3 profile after SOI.
    fn with_p3_profile(jpeg: &[u8]) -> Vec<u8> {
        let profile = moxcms::ColorProfile::new_display_p3().encode().unwrap();
        let mut segment = vec![0xff, 0xe2];
        segment.extend_from_slice(&((2 + 14 + profile.len()) as u16).to_be_bytes());
        segment.extend_from_slice(b"ICC_PROFILE\0\x01\x01");
        segment.extend_from_slice(&profile);
        [&jpeg[..2], &segment, &jpeg[2..]].concat()
    }

    fn still(decoded: Decoded) -> DynamicImage {
        match decoded.pixels {
            Pixels::Still(img) => img,
            Pixels::Animated(_) => panic!("not a still image"),
        }
    }

    #[test]
    fn a_p3_profile_is_applied_on_every_decoding_path() {
        let p3 = moxcms::ColorProfile::new_display_p3().encode().unwrap();
        let thumb = crate::action::Action::parse("resize:w_50|format:t_png").unwrap();
        let (_, lead) = crate::imaging::geometry::lead(&thumb);
        let limits = Limits::default();
        let cases = [
            // Our DC decoder; libjpeg-turbo at 1/8 (baseline 4:2:0); at
            // full scale; the DC scans a thumbnail reads of a progressive file.
            (
                "dc",
                baseline("storm.jpg", 1, raw::TJSAMP_TJSAMP_444 as u32, 0),
                lead,
            ),
            (
                "turbo 1/8",
                baseline("storm.jpg", 1, raw::TJSAMP_TJSAMP_420 as u32, 0),
                lead,
            ),
            (
                "full",
                baseline("storm.jpg", 1, raw::TJSAMP_TJSAMP_420 as u32, 0),
                Lead::Nothing,
            ),
            (
                "progressive",
                progressive("storm.jpg", raw::TJSAMP_TJSAMP_420 as u32, 0),
                lead,
            ),
        ];
        for (name, jpeg, lead) in cases {
            let tagged = with_p3_profile(&jpeg);
            let (plain, tagged) = if name == "progressive" {
                let action = "resize:w_50|format:t_png";
                (
                    read_source(&jpeg, action, 1 << 20),
                    read_source(&tagged, action, 1 << 20),
                )
            } else {
                (jpeg, tagged)
            };
            let mut expected = still(decode(&plain, &limits, lead).unwrap());
            let untouched = expected.clone();
            super::super::colour::to_srgb(&mut expected, &p3);
            assert!(expected != untouched, "{name}: P3 moved no colour");
            assert!(
                still(decode(&tagged, &limits, lead).unwrap()) == expected,
                "{name}"
            );
        }
        // A PNG's profile, from its iCCP chunk.
        let img = image::open(format!(
            "{}/fixtures/images/storm.jpg",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
        .to_rgb8();
        let mut expected = DynamicImage::ImageRgb8(img.clone());
        super::super::colour::to_srgb(&mut expected, &p3);
        let mut png = Vec::new();
        let mut encoder = image::codecs::png::PngEncoder::new(&mut png);
        image::ImageEncoder::set_icc_profile(&mut encoder, p3.clone()).unwrap();
        image::ImageEncoder::write_image(
            encoder,
            &img,
            img.width(),
            img.height(),
            image::ExtendedColorType::Rgb8,
        )
        .unwrap();
        assert!(
            still(decode(&png, &limits, Lead::Nothing).unwrap()) == expected,
            "png"
        );
    }

    /// `webp` with chunks added: `first` right after its VP8X header (made
    /// for a simple-format file), `last` at its end, `flags` set in the
    /// header.
    fn webp_with(
        webp: &[u8],
        flags: u8,
        first: &[(&[u8; 4], &[u8])],
        last: &[(&[u8; 4], &[u8])],
    ) -> Vec<u8> {
        let chunk = |out: &mut Vec<u8>, id: &[u8; 4], payload: &[u8]| {
            out.extend_from_slice(id);
            out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            out.extend_from_slice(payload);
            if payload.len() % 2 == 1 {
                out.push(0);
            }
        };
        let mut out = webp[..12].to_vec();
        let body = if &webp[12..16] == b"VP8X" {
            out.extend_from_slice(&webp[12..30]);
            out[20] |= flags;
            &webp[30..]
        } else {
            let img = image::load_from_memory(webp).unwrap();
            let (w, h) = (img.width(), img.height());
            let mut header = vec![flags, 0, 0, 0];
            header.extend_from_slice(&(w - 1).to_le_bytes()[..3]);
            header.extend_from_slice(&(h - 1).to_le_bytes()[..3]);
            chunk(&mut out, b"VP8X", &header);
            &webp[12..]
        };
        for (id, payload) in first {
            chunk(&mut out, id, payload);
        }
        out.extend_from_slice(body);
        for (id, payload) in last {
            chunk(&mut out, id, payload);
        }
        let riff = (out.len() - 8) as u32;
        out[4..8].copy_from_slice(&riff.to_le_bytes());
        out
    }

    fn frames(decoded: Decoded) -> Vec<image::RgbaImage> {
        match decoded.pixels {
            Pixels::Animated(frames) => frames.into_iter().map(|f| f.into_buffer()).collect(),
            Pixels::Still(_) => panic!("a still image"),
        }
    }

    #[test]
    fn an_animated_webp_has_its_profile_applied_to_every_frame() {
        let limits = Limits::default();
        let p3 = moxcms::ColorProfile::new_display_p3().encode().unwrap();
        // Two frames of mid-tones, which P3 and sRGB tell apart.
        let frame = |colour: [u8; 4]| {
            image::Frame::from_parts(
                image::RgbaImage::from_pixel(16, 8, image::Rgba(colour)),
                0,
                0,
                image::Delay::from_numer_denom_ms(100, 1),
            )
        };
        let mut config = webp::WebPConfig::new().unwrap();
        config.lossless = 1;
        let plain = super::super::webp_anim::encode(
            &[frame([60, 128, 200, 255]), frame([200, 100, 50, 128])],
            &config,
            0,
        )
        .unwrap();
        let tagged = webp_with(&plain, 0x20, &[(b"ICCP", &p3)], &[]);
        let plain = frames(decode(&plain, &limits, Lead::Nothing).unwrap());
        let tagged = frames(decode(&tagged, &limits, Lead::Nothing).unwrap());
        assert_eq!(tagged.len(), 2);
        for (i, (plain, tagged)) in plain.into_iter().zip(tagged).enumerate() {
            let mut expected = DynamicImage::ImageRgba8(plain.clone());
            super::super::colour::to_srgb(&mut expected, &p3);
            assert!(
                expected.to_rgba8() != plain,
                "frame {i}: P3 moved no colour"
            );
            assert!(expected.to_rgba8() == tagged, "frame {i}");
        }
    }

    #[test]
    fn a_webp_exif_chunk_is_read_with_or_without_the_jpeg_marker() {
        // Make "Abc" and Orientation 6, little-endian, inline values.
        let tiff: [u8; 38] = [
            0x49, 0x49, 0x2a, 0x00, 0x08, 0x00, 0x00, 0x00, // header, IFD at 8
            0x02, 0x00, // two entries
            0x0f, 0x01, 0x02, 0x00, 0x04, 0x00, 0x00, 0x00, b'A', b'b', b'c', 0x00, // Make
            0x12, 0x01, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, 0x06, 0x00, 0x00,
            0x00, // Orientation
            0x00, 0x00, 0x00, 0x00, // no next IFD
        ];
        let marked = [&b"Exif\0\0"[..], &tiff].concat();
        let mut still_webp = Vec::new();
        image::RgbImage::from_pixel(30, 20, image::Rgb([10, 200, 30]))
            .write_with_encoder(image::codecs::webp::WebPEncoder::new_lossless(
                &mut still_webp,
            ))
            .unwrap();
        let animated = super::super::tests::fixture("three-frames.webp");
        let limits = Limits::default();
        for (name, source, turned) in [
            ("still", &still_webp, (20, 30)),
            ("animated", &animated, (24, 32)),
        ] {
            for exif in [&tiff[..], &marked] {
                let webp = webp_with(source, 0x08, &[], &[(b"EXIF", exif)]);
                let marker = exif.len() != tiff.len();
                assert_eq!(exif_orientation(&webp), 6, "{name}, marker {marker}");
                assert_eq!(
                    read_exif(&webp).and_then(|e| e
                        .get_field(exif::Tag::Make, exif::In::PRIMARY)
                        .map(|f| f.display_value().to_string())),
                    Some("\"Abc\"".to_string()),
                    "{name}, marker {marker}"
                );
                let decoded = decode(&webp, &limits, Lead::Nothing).unwrap();
                assert_eq!(decoded.meta.orientation, 6, "{name}, marker {marker}");
                let size = match &decoded.pixels {
                    Pixels::Still(img) => (img.width(), img.height()),
                    Pixels::Animated(frames) => frames[0].buffer().dimensions(),
                };
                assert_eq!(size, turned, "{name}, marker {marker}: turned");
            }
        }
    }

    #[test]
    fn a_region_decodes_to_the_pixels_of_the_whole_decode() {
        // libjpeg-turbo upsamples chroma at a region's edges as at the
        // image's: a crop of a 4:2:0 or 4:2:2 file must still get the full
        // decode's pixels, at every edge the image continues past.
        let limits = Limits::default();
        for subsamp in [raw::TJSAMP_TJSAMP_420, raw::TJSAMP_TJSAMP_422] {
            let jpeg = baseline("storm.jpg", 2, subsamp as u32, 0);
            let whole = still(decode(&jpeg, &limits, Lead::Nothing).unwrap()).to_rgb8();
            for (x, y, w, h) in [
                (300, 200, 40, 40),
                (16, 16, 64, 48),
                (0, 0, 100, 80),
                (333, 17, 77, 91),
                (880, 560, 80, 80),
            ] {
                let action =
                    crate::action::Action::parse(&format!("crop:l_{x},t_{y},w_{w},h_{h}")).unwrap();
                let (_, lead) = crate::imaging::geometry::lead(&action);
                let decoded = decode(&jpeg, &limits, lead).unwrap();
                assert!(decoded.lead_applied);
                let region = still(decoded).to_rgb8();
                let expected = image::imageops::crop_imm(&whole, x, y, w, h).to_image();
                let worst = region
                    .pixels()
                    .zip(expected.pixels())
                    .enumerate()
                    .map(|(i, (a, b))| {
                        let d = (0..3).map(|c| a[c].abs_diff(b[c])).max().unwrap_or(0);
                        (d, i as u32 % w, i as u32 / w)
                    })
                    .max()
                    .unwrap();
                assert_eq!(
                    worst.0, 0,
                    "subsamp {subsamp}, crop {x},{y} {w}x{h}: {worst:?} (level, x, y)"
                );
            }
        }
    }
}
