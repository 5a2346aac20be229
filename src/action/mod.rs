//! The action language: `operation:k_v[,k_v]...[|operation:...]...`.
//!
//! Parsing turns a rule's action string into a typed [`Action`] once, at the
//! edge; everything after works with validated values. Printing an action
//! gives its canonical form, which parses back to the same value.

mod error;
mod parse;
mod print;

pub use error::ActionError;

use std::fmt;

/// A parsed pipeline: operations run left to right.
#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    pub ops: Vec<Op>,
}

impl Action {
    /// Parses an action string, naming the operation, key and value on error.
    pub fn parse(input: &str) -> Result<Action, ActionError> {
        parse::parse(input)
    }

    /// The output format the pipeline asks for, if any (the last `format` wins).
    pub fn output_format(&self) -> Option<Format> {
        self.ops.iter().rev().find_map(|op| match op {
            Op::Format(f) => Some(*f),
            _ => None,
        })
    }

    /// True when the pipeline ends with `info`.
    pub fn ends_with_info(&self) -> bool {
        matches!(self.ops.last(), Some(Op::Info))
    }
}

impl std::str::FromStr for Action {
    type Err = ActionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Action::parse(s)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        print::write_action(self, f)
    }
}

/// One step of a pipeline.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Info,
    Crop(Crop),
    Rotate(Rotation),
    Resize(Resize),
    Watermark(TextWatermark),
    WatermarkImage(ImageWatermark),
    Format(Format),
    Save(Save),
}

impl Op {
    /// The operation's name in the action language.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Info => "info",
            Op::Crop(_) => "crop",
            Op::Rotate(_) => "rotate",
            Op::Resize(_) => "resize",
            Op::Watermark(_) => "watermark",
            Op::WatermarkImage(_) => "watermark_image",
            Op::Format(_) => "format",
            Op::Save(_) => "save",
        }
    }
}

/// `crop`: a `width` x `height` region placed by gravity or by offset.
/// A missing side means the image's own; sizes beyond the image are clamped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crop {
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub anchor: CropAnchor,
}

/// Where a crop region sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CropAnchor {
    Gravity(Gravity),
    /// From (left, top) to the end of the image, or `width` x `height` from there.
    Offset {
        left: u32,
        top: u32,
    },
}

/// QingStor's gravity numbering (5-8 differ from libvips' own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gravity {
    Center = 0,
    North = 1,
    East = 2,
    South = 3,
    West = 4,
    NorthWest = 5,
    NorthEast = 6,
    SouthWest = 7,
    SouthEast = 8,
    /// The most interesting region (attention-based smart crop).
    Auto = 9,
}

impl Gravity {
    pub const ALL: [Gravity; 10] = [
        Gravity::Center,
        Gravity::North,
        Gravity::East,
        Gravity::South,
        Gravity::West,
        Gravity::NorthWest,
        Gravity::NorthEast,
        Gravity::SouthWest,
        Gravity::SouthEast,
        Gravity::Auto,
    ];

    pub fn from_number(n: u32) -> Option<Gravity> {
        Gravity::ALL.get(n as usize).copied()
    }

    pub fn number(self) -> u32 {
        self as u32
    }
}

/// `rotate`: clockwise quarter turns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    R0,
    R90,
    R180,
    R270,
}

impl Rotation {
    pub fn degrees(self) -> u32 {
        match self {
            Rotation::R0 => 0,
            Rotation::R90 => 90,
            Rotation::R180 => 180,
            Rotation::R270 => 270,
        }
    }

    pub fn from_degrees(a: u32) -> Option<Rotation> {
        match a {
            0 => Some(Rotation::R0),
            90 => Some(Rotation::R90),
            180 => Some(Rotation::R180),
            270 => Some(Rotation::R270),
            _ => None,
        }
    }
}

/// `resize`: at least one of `width`/`height`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resize {
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub mode: ResizeMode,
}

/// How `resize` treats a box when both sides are given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeMode {
    /// `m_0`: fit inside, then pad to exactly w x h.
    Pad = 0,
    /// `m_1`: fit inside; one side may come out smaller.
    Fit = 1,
    /// `m_2`: cover, then centre-crop to exactly w x h.
    Cover = 2,
}

impl ResizeMode {
    pub fn from_number(n: u32) -> Option<ResizeMode> {
        match n {
            0 => Some(ResizeMode::Pad),
            1 => Some(ResizeMode::Fit),
            2 => Some(ResizeMode::Cover),
            _ => None,
        }
    }
}

/// An opacity in (0, 1].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Opacity(f32);

impl Opacity {
    pub const DEFAULT: Opacity = Opacity(0.25);

    /// Clamps values above 1 to 1 (QingStor accepts them); refuses 0, negatives,
    /// NaN and infinities.
    pub fn new(value: f32) -> Option<Opacity> {
        if !value.is_finite() || value <= 0.0 {
            None
        } else {
            Some(Opacity(value.min(1.0)))
        }
    }

    pub fn get(self) -> f32 {
        self.0
    }
}

/// An sRGB colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Color {
    pub r: u8,
    pub g: u8,
    pub b: u8,
}

impl Color {
    pub const BLACK: Color = Color { r: 0, g: 0, b: 0 };

    /// Parses `#rrggbb` (the `#` optional, any case).
    pub fn parse_hex(s: &str) -> Option<Color> {
        let hex = s.strip_prefix('#').unwrap_or(s);
        if hex.len() != 6 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let byte = |i: usize| u8::from_str_radix(&hex[i..i + 2], 16).ok();
        Some(Color {
            r: byte(0)?,
            g: byte(2)?,
            b: byte(4)?,
        })
    }
}

impl fmt::Display for Color {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{:02x}{:02x}{:02x}", self.r, self.g, self.b)
    }
}

/// `watermark`: tiled text.
#[derive(Debug, Clone, PartialEq)]
pub struct TextWatermark {
    pub text: String,
    pub opacity: Opacity,
    /// Rendering resolution: a 10 pt font at `dpi` is `10 * dpi / 72` px.
    pub dpi: u32,
    pub color: Color,
}

impl TextWatermark {
    pub const DEFAULT_DPI: u32 = 150;

    /// The font size in pixels.
    pub fn em_px(&self) -> f32 {
        10.0 * self.dpi as f32 / 72.0
    }
}

/// `watermark_image`: another image composited at (`left`, `top`).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageWatermark {
    pub url: String,
    pub left: u32,
    pub top: u32,
    pub opacity: Opacity,
}

/// `format`: the output encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Format {
    pub kind: FormatKind,
    /// 1-100; `None` means the format's default.
    pub quality: Option<u8>,
}

impl Format {
    /// The quality to encode with (jpeg 75, webp 80 unless given).
    pub fn effective_quality(&self) -> u8 {
        self.quality.unwrap_or(match self.kind {
            FormatKind::Webp => 80,
            _ => 75,
        })
    }
}

/// Output encodings `format:t_` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatKind {
    Jpeg,
    Png,
    Webp,
    Tiff,
}

impl FormatKind {
    pub const NAMES: &'static str = "jpeg, png, webp, tiff";

    pub fn name(self) -> &'static str {
        match self {
            FormatKind::Jpeg => "jpeg",
            FormatKind::Png => "png",
            FormatKind::Webp => "webp",
            FormatKind::Tiff => "tiff",
        }
    }

    /// Accepts the names and the common aliases `jpg` and `tif`, any case.
    pub fn from_name(s: &str) -> Option<FormatKind> {
        match s.to_ascii_lowercase().as_str() {
            "jpeg" | "jpg" => Some(FormatKind::Jpeg),
            "png" => Some(FormatKind::Png),
            "webp" => Some(FormatKind::Webp),
            "tiff" | "tif" => Some(FormatKind::Tiff),
            _ => None,
        }
    }
}

/// `save`: also store the current image at `bucket`/`key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Save {
    pub bucket: String,
    pub key: String,
}

#[cfg(test)]
mod tests;
