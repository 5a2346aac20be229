//! Animated WebP through libwebp's own animation encoder and decoder
//! (`WebPAnimEncoder`, `WebPAnimDecoder`).
//!
//! The `webp` crate wraps the encoder too, but ends the animation with a
//! timestamp of 0, which libwebp refuses, so the last frame gets the average
//! duration of the others instead of its own. `image`'s WebP decoder clears
//! a disposed frame at the wrong place when the next frame has no alpha.
//! This module makes libwebp's calls itself.

use std::ffi::{CStr, c_int};
use std::marker::PhantomData;
use std::mem::MaybeUninit;

use image::{Delay, Frame, RgbaImage};
use libwebp_sys as sys;

/// One libwebp animation encoder.
struct Encoder(*mut sys::WebPAnimEncoder);

impl Encoder {
    fn error(&self) -> String {
        // SAFETY: the encoder is valid; libwebp returns a NUL-terminated
        // string it owns, or null.
        let message = unsafe { sys::WebPAnimEncoderGetError(self.0) };
        if message.is_null() {
            return "the animation encoder failed".into();
        }
        // SAFETY: checked non-null above; valid until the next call.
        unsafe { CStr::from_ptr(message) }
            .to_string_lossy()
            .into_owned()
    }
}

impl Drop for Encoder {
    fn drop(&mut self) {
        // SAFETY: the encoder came from WebPAnimEncoderNewInternal and is
        // deleted once.
        unsafe { sys::WebPAnimEncoderDelete(self.0) }
    }
}

/// One frame's pixels as libwebp takes them.
struct Picture(sys::WebPPicture);

impl Picture {
    fn from_rgba(rgba: &image::RgbaImage) -> Result<Picture, String> {
        let (width, height) = rgba.dimensions();
        let mut picture = MaybeUninit::<sys::WebPPicture>::uninit();
        // SAFETY: initialises the struct in place; a zero result (a libwebp
        // of another ABI) is checked.
        let ok = unsafe {
            sys::WebPPictureInitInternal(
                picture.as_mut_ptr(),
                sys::WEBP_ENCODER_ABI_VERSION as c_int,
            )
        };
        if ok == 0 {
            return Err("libwebp's encoder is of another version".into());
        }
        // SAFETY: initialised just above.
        let mut picture = Picture(unsafe { picture.assume_init() });
        picture.0.use_argb = 1;
        picture.0.width = width as c_int;
        picture.0.height = height as c_int;
        // SAFETY: `rgba` holds width x height pixels of 4 bytes, rows
        // `width * 4` apart; libwebp copies them into memory it allocates
        // and the picture's Drop frees.
        let ok = unsafe {
            sys::WebPPictureImportRGBA(&mut picture.0, rgba.as_ptr(), (width * 4) as c_int)
        };
        if ok == 0 {
            return Err("out of memory for a frame".into());
        }
        Ok(picture)
    }
}

impl Drop for Picture {
    fn drop(&mut self) {
        // SAFETY: the picture was initialised; freeing an empty one is a no-op.
        unsafe { sys::WebPPictureFree(&mut self.0) }
    }
}

/// Encodes `frames` (composited, all of one size) as an animated WebP that
/// plays `loop_count` times (0: forever), each frame for its own delay.
pub(super) fn encode(
    frames: &[Frame],
    config: &sys::WebPConfig,
    loop_count: u16,
) -> Result<Vec<u8>, String> {
    let (width, height) = frames
        .first()
        .map(|f| f.buffer().dimensions())
        .ok_or("the animation has no frames")?;
    let mut options = MaybeUninit::<sys::WebPAnimEncoderOptions>::uninit();
    // SAFETY: initialises the struct in place; a zero result is checked.
    let ok = unsafe {
        sys::WebPAnimEncoderOptionsInitInternal(
            options.as_mut_ptr(),
            sys::WEBP_MUX_ABI_VERSION as c_int,
        )
    };
    if ok == 0 {
        return Err("libwebp's animation encoder is of another version".into());
    }
    // SAFETY: initialised just above.
    let mut options = unsafe { options.assume_init() };
    options.anim_params.loop_count = c_int::from(loop_count);
    // SAFETY: the options are initialised; a null result is checked.
    let encoder = unsafe {
        sys::WebPAnimEncoderNewInternal(
            width as c_int,
            height as c_int,
            &options,
            sys::WEBP_MUX_ABI_VERSION as c_int,
        )
    };
    if encoder.is_null() {
        return Err(format!("cannot start an animation of {width}x{height}"));
    }
    let encoder = Encoder(encoder);
    let mut timestamp: c_int = 0;
    for frame in frames {
        if frame.buffer().dimensions() != (width, height) {
            return Err("the frames differ in size".into());
        }
        let mut picture = Picture::from_rgba(frame.buffer())?;
        // SAFETY: the encoder, picture and config are valid; libwebp copies
        // what it keeps of the picture.
        let ok = unsafe { sys::WebPAnimEncoderAdd(encoder.0, &mut picture.0, timestamp, config) };
        if ok == 0 {
            return Err(encoder.error());
        }
        let (numer, denom) = frame.delay().numer_denom_ms();
        let delay = c_int::try_from(numer / denom.max(1)).unwrap_or(c_int::MAX);
        timestamp = timestamp.saturating_add(delay);
    }
    // The end of the last frame, so that it lasts its own delay.
    // SAFETY: a null picture marks the end, as libwebp documents.
    let ok = unsafe {
        sys::WebPAnimEncoderAdd(encoder.0, std::ptr::null_mut(), timestamp, std::ptr::null())
    };
    if ok == 0 {
        return Err(encoder.error());
    }
    let mut data = sys::WebPData::default();
    // SAFETY: the encoder is valid; on success libwebp fills `data` with
    // memory it allocated, copied and then freed below.
    if unsafe { sys::WebPAnimEncoderAssemble(encoder.0, &mut data) } == 0 {
        return Err(encoder.error());
    }
    // SAFETY: `data` holds `size` bytes from libwebp.
    let mut bytes = unsafe { std::slice::from_raw_parts(data.bytes, data.size) }.to_vec();
    // SAFETY: frees the memory libwebp allocated, once.
    unsafe { sys::WebPDataClear(&mut data) };
    // libwebp cuts each frame to the part that changed, and flags alpha
    // only when a part it kept has some; a clear canvas around opaque
    // parts then read as opaque black to decoders that follow the flag.
    let clear = frames
        .iter()
        .any(|f| f.buffer().pixels().any(|p| p[3] < u8::MAX));
    if clear && bytes.len() > VP8X_FLAGS && &bytes[12..16] == b"VP8X" {
        bytes[VP8X_FLAGS] |= VP8X_ALPHA;
    }
    Ok(bytes)
}

/// Where a WebP file's VP8X flags are, and its alpha flag.
const VP8X_FLAGS: usize = 20;
const VP8X_ALPHA: u8 = 0x10;

/// An animated WebP's canvas size, frame count and loop count (plays; 0:
/// forever), from its headers.
#[derive(Debug, Clone, Copy)]
pub(super) struct Info {
    pub width: u32,
    pub height: u32,
    pub frames: u32,
    pub loop_count: u32,
}

/// libwebp's animation decoder over `input`, which it reads in place.
pub(super) struct Decoder<'a> {
    raw: *mut sys::WebPAnimDecoder,
    info: Info,
    /// The end of the last frame given, in ms.
    shown_until: c_int,
    input: PhantomData<&'a [u8]>,
}

impl<'a> Decoder<'a> {
    pub(super) fn new(input: &'a [u8]) -> Result<Decoder<'a>, String> {
        let mut options = MaybeUninit::<sys::WebPAnimDecoderOptions>::uninit();
        // SAFETY: initialises the struct in place; a zero result is checked.
        let ok = unsafe {
            sys::WebPAnimDecoderOptionsInitInternal(
                options.as_mut_ptr(),
                sys::WEBP_DEMUX_ABI_VERSION as c_int,
            )
        };
        if ok == 0 {
            return Err("libwebp's animation decoder is of another version".into());
        }
        // SAFETY: initialised just above.
        let mut options = unsafe { options.assume_init() };
        options.color_mode = sys::WEBP_CSP_MODE::MODE_RGBA;
        options.use_threads = 0;
        let data = sys::WebPData {
            bytes: input.as_ptr(),
            size: input.len(),
        };
        // SAFETY: `data` points at `input`, which outlives the decoder (its
        // lifetime is the decoder's); a null result is checked.
        let raw = unsafe {
            sys::WebPAnimDecoderNewInternal(&data, &options, sys::WEBP_DEMUX_ABI_VERSION as c_int)
        };
        if raw.is_null() {
            return Err("not a valid animated WebP".into());
        }
        let mut info = MaybeUninit::<sys::WebPAnimInfo>::uninit();
        let mut decoder = Decoder {
            raw,
            info: Info {
                width: 0,
                height: 0,
                frames: 0,
                loop_count: 0,
            },
            shown_until: 0,
            input: PhantomData,
        };
        // SAFETY: the decoder is valid; `info` is filled on success.
        if unsafe { sys::WebPAnimDecoderGetInfo(raw, info.as_mut_ptr()) } == 0 {
            return Err("cannot read the animation's header".into());
        }
        // SAFETY: filled just above.
        let info = unsafe { info.assume_init() };
        decoder.info = Info {
            width: info.canvas_width,
            height: info.canvas_height,
            frames: info.frame_count,
            loop_count: info.loop_count,
        };
        Ok(decoder)
    }

    pub(super) fn info(&self) -> Info {
        self.info
    }

    /// The next frame composited on the canvas (clear where nothing was
    /// drawn), with its delay; `None` after the last.
    pub(super) fn next_frame(&mut self) -> Result<Option<Frame>, String> {
        // SAFETY: the decoder is valid.
        if unsafe { sys::WebPAnimDecoderHasMoreFrames(self.raw) } == 0 {
            return Ok(None);
        }
        let mut canvas: *mut u8 = std::ptr::null_mut();
        let mut ends_at: c_int = 0;
        // SAFETY: the decoder is valid; on success `canvas` points at its
        // own width x height x 4 bytes, valid until the next call.
        if unsafe { sys::WebPAnimDecoderGetNext(self.raw, &mut canvas, &mut ends_at) } == 0
            || canvas.is_null()
        {
            return Err("a frame does not decode".into());
        }
        let (width, height) = (self.info.width, self.info.height);
        let len = width as usize * height as usize * 4;
        // SAFETY: see above; copied out at once.
        let pixels = unsafe { std::slice::from_raw_parts(canvas, len) }.to_vec();
        let buffer = RgbaImage::from_raw(width, height, pixels)
            .ok_or("a frame's size does not match its canvas")?;
        let delay = ends_at.saturating_sub(self.shown_until).max(0) as u32;
        self.shown_until = ends_at;
        Ok(Some(Frame::from_parts(
            buffer,
            0,
            0,
            Delay::from_numer_denom_ms(delay, 1),
        )))
    }
}

impl Drop for Decoder<'_> {
    fn drop(&mut self) {
        // SAFETY: the decoder came from WebPAnimDecoderNewInternal and is
        // deleted once.
        unsafe { sys::WebPAnimDecoderDelete(self.raw) }
    }
}

#[cfg(test)]
mod tests {
    use image::{Delay, Frame, Rgba, RgbaImage};

    #[test]
    fn frames_keep_their_delays_loop_count_and_clear_canvas() {
        let dot = |x: u32, colour: [u8; 4]| {
            let mut img = RgbaImage::new(32, 24);
            for y in 4..12 {
                for dx in 0..6 {
                    img.put_pixel(x + dx, y, Rgba(colour));
                }
            }
            img
        };
        let frames = vec![
            Frame::from_parts(
                dot(2, [255, 0, 0, 255]),
                0,
                0,
                Delay::from_numer_denom_ms(100, 1),
            ),
            Frame::from_parts(
                dot(20, [0, 0, 255, 255]),
                0,
                0,
                Delay::from_numer_denom_ms(300, 1),
            ),
        ];
        let mut config = webp::WebPConfig::new().unwrap();
        config.quality = 90.0;
        let bytes = super::encode(&frames, &config, 2).unwrap();
        let mut decoder = super::Decoder::new(&bytes).unwrap();
        let info = decoder.info();
        assert_eq!((info.width, info.height, info.frames), (32, 24, 2));
        assert_eq!(info.loop_count, 2);
        let decoded: Vec<Frame> = std::iter::from_fn(|| decoder.next_frame().unwrap()).collect();
        assert_eq!(decoded.len(), 2);
        let delays: Vec<(u32, u32)> = decoded.iter().map(|f| f.delay().numer_denom_ms()).collect();
        assert_eq!(delays, [(100, 1), (300, 1)]);
        let first = decoded[0].buffer();
        assert_eq!(first.get_pixel(0, 0)[3], 0, "the canvas stays clear");
        let red = first.get_pixel(4, 8);
        assert!(red[0] > 200 && red[2] < 60 && red[3] == 255, "{red:?}");
        let blue = decoded[1].buffer().get_pixel(22, 8);
        assert!(blue[2] > 200 && blue[0] < 60, "{blue:?}");
        assert_eq!(decoded[1].buffer().get_pixel(4, 8)[3], 0, "red is gone");
    }
}
