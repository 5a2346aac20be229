//! Scaled, cropped JPEG decoding through libjpeg-turbo's TurboJPEG 3 API.
//!
//! The `turbojpeg` crate wraps scaling but not the cropping region, which
//! lets libjpeg-turbo skip the IDCT, upsampling and colour conversion of
//! every column outside the region; this module calls those functions itself.

use std::ffi::{CStr, c_int};

use turbojpeg::raw;

/// A region in scaled pixel coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// One TurboJPEG decompressor instance.
struct Handle(raw::tjhandle);

impl Handle {
    fn new() -> Result<Handle, String> {
        // SAFETY: tj3Init has no preconditions; a null result is checked.
        let ptr = unsafe { raw::tj3Init(raw::TJINIT_TJINIT_DECOMPRESS as c_int) };
        if ptr.is_null() {
            return Err("cannot initialise the JPEG decoder".into());
        }
        Ok(Handle(ptr))
    }

    fn error(&self) -> String {
        // SAFETY: the handle is valid; the library returns a NUL-terminated
        // string that stays valid until the next call on this handle.
        unsafe { CStr::from_ptr(raw::tj3GetErrorStr(self.0)) }
            .to_string_lossy()
            .into_owned()
    }

    fn check(&self, status: c_int) -> Result<(), String> {
        if status == 0 {
            Ok(())
        } else {
            Err(self.error())
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init and is destroyed once.
        unsafe { raw::tj3Destroy(self.0) }
    }
}

/// Decodes `jpeg` to RGB at `1/denom` scale (1, 2, 4 or 8), only the pixels
/// of `region` (in scaled coordinates; `x` must be a multiple of
/// [`scaled_mcu_width`]). Returns the pixels, `region.width` x `region.height`.
pub fn decode_rgb(jpeg: &[u8], denom: u32, region: Region) -> Result<Vec<u8>, String> {
    let handle = Handle::new()?;
    // SAFETY: the handle is valid and `jpeg` outlives the call.
    handle.check(unsafe {
        raw::tj3DecompressHeader(handle.0, jpeg.as_ptr(), jpeg.len() as raw::size_t)
    })?;
    let factor = raw::tjscalingfactor {
        num: 1,
        denom: denom as c_int,
    };
    // SAFETY: plain parameter setters and getters on a valid handle.
    handle.check(unsafe { raw::tj3SetScalingFactor(handle.0, factor) })?;
    // SAFETY: as above.
    handle.check(unsafe {
        raw::tj3Set(
            handle.0,
            raw::TJPARAM_TJPARAM_SCANLIMIT as c_int,
            super::jpeg_progressive::MAX_SCANS as c_int,
        )
    })?;
    let scaled = |param| {
        // SAFETY: as above; the header was read, so the value is the file's.
        let full = unsafe { raw::tj3Get(handle.0, param as c_int) };
        u32::try_from(full).map_or(0, |v| v.div_ceil(denom))
    };
    let (sw, sh) = (
        scaled(raw::TJPARAM_TJPARAM_JPEGWIDTH),
        scaled(raw::TJPARAM_TJPARAM_JPEGHEIGHT),
    );
    let whole = (region.x, region.y, region.width, region.height) == (0, 0, sw, sh);
    let crop = raw::tjregion {
        x: region.x as c_int,
        y: region.y as c_int,
        w: region.width as c_int,
        h: region.height as c_int,
    };
    // libjpeg-turbo refuses a region for some files (sampling factors it
    // does not name, lossless JPEG), which it decodes whole; a region of
    // those is cut from the whole decode.
    // SAFETY: as above.
    let cropped = whole
        || handle
            .check(unsafe { raw::tj3SetCroppingRegion(handle.0, crop) })
            .is_ok();
    let (width, height) = if cropped {
        (region.width, region.height)
    } else {
        (sw, sh)
    };
    if !cropped
        && (region.x.saturating_add(region.width) > sw
            || region.y.saturating_add(region.height) > sh)
    {
        return Err(format!(
            "region {}x{} at ({}, {}) is outside the {sw}x{sh} image",
            region.width, region.height, region.x, region.y
        ));
    }
    let pitch = width as usize * 3;
    let mut pixels = vec![0u8; pitch * height as usize];
    // SAFETY: `pixels` holds exactly `height` rows of `pitch` bytes, which is
    // what TurboJPEG writes for the region set above, or the whole image.
    handle.check(unsafe {
        raw::tj3Decompress8(
            handle.0,
            jpeg.as_ptr(),
            jpeg.len() as raw::size_t,
            pixels.as_mut_ptr(),
            pitch as c_int,
            raw::TJPF_TJPF_RGB as c_int,
        )
    })?;
    if cropped {
        return Ok(pixels);
    }
    let row = region.width as usize * 3;
    let mut out = Vec::with_capacity(row * region.height as usize);
    for y in region.y..region.y + region.height {
        let start = y as usize * pitch + region.x as usize * 3;
        out.extend_from_slice(&pixels[start..start + row]);
    }
    Ok(out)
}

/// The width of one iMCU column at `1/denom` scale: cropping regions start
/// on multiples of it.
pub fn scaled_mcu_width(subsamp: turbojpeg::Subsamp, denom: u32) -> u32 {
    (subsamp.mcu_width() as u32 / denom).max(1)
}
