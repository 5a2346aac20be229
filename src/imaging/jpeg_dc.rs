//! Eighth-scale decoding of JPEGs from their DC coefficients alone.
//!
//! At 1/8 scale every 8x8 block becomes one pixel whose value depends only on
//! the block's DC coefficient. A progressive file sends all DC coefficients
//! in its first scans (plus, usually, one refinement scan of a bit each), so a
//! thumbnail needs only those few hundred kilobytes of a file of several
//! megabytes. libjpeg-turbo, given the whole file, would still decode every
//! AC scan into a whole-image coefficient buffer (128 bytes per block, zeroed
//! first) and run an IDCT per block; this decoder reads the DC scans into one
//! integer per block, skips the AC scans by looking for their end marker,
//! stops reading once every component's DC coefficients are precise enough
//! (see [`Precision`]), and converts colour on the small image.
//!
//! A baseline (sequential) file interleaves every coefficient of a block, so
//! all of it is read; this decoder keeps the DC and skips the AC codes with
//! one table lookup per coefficient for most of them ([`AcSkip`]), where
//! libjpeg-turbo takes two steps per coefficient, then zeroes, dequantises
//! and transforms every block. Its 4:2:0 files are left to libjpeg-turbo:
//! there it decodes chroma with a 2x2 IDCT whose AC terms the DC alone
//! lacks.
//!
//! Waiting for every bit, the output is libjpeg-turbo's at scale 1/8 for
//! the same DC data: the same dequantisation and rounding, the same YCbCr
//! conversion; subsampled chroma is repeated over the pixels its block
//! covers, which is what libjpeg-turbo's scaled IDCT yields when a block has
//! no AC terms. Anything this decoder does
//! not cover (other frame types, 12-bit samples, four components, RGB-coded
//! files, odd sampling ratios, truncated or damaged scans) gives `None`, and
//! the caller decodes with libjpeg-turbo instead.

/// How many bits of the DC coefficients the decoder waits for.
///
/// Progressive encoders usually send DC in two steps: every bit but the
/// last in the first scan (successive approximation `Al = 1`), the last bit
/// in a refinement scan placed after most of the AC data (libjpeg's standard
/// progression puts it at about 70 % of the file). Bits not yet sent are
/// worth up to `quantiser x (2^Al - 1) / 8` grey levels at this scale;
/// taking the middle of their range leaves at most half of that. The value
/// is the largest such error allowed, in sixteenths of a level: 0 waits for
/// every bit and gives libjpeg-turbo's pixels exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Precision(pub(super) u32);

impl Precision {
    /// Stops before refinement scans whose bits are worth at most half a
    /// grey level (`quantiser x (2^Al - 1) <= 8`): each sample is then
    /// within one level of the exact decode before colour conversion.
    /// Files saved at quality 75 or more qualify; coarser ones are read to
    /// the last bit.
    pub const HALF_LEVEL: Precision = Precision(8);
}

/// Tracks, from a file's tables, frame and DC scans, how many bits of each
/// component's DC coefficients have been sent, and so when an eighth-scale
/// decode has all it needs.
#[derive(Default)]
pub(super) struct DcBits {
    /// The DC quantiser of each table, as last defined.
    tables: [Option<i32>; 4],
    /// In frame order.
    components: Vec<ComponentBits>,
}

struct ComponentBits {
    id: u8,
    table: usize,
    /// Once a DC scan has covered the component: the quantiser taken at
    /// that first scan, as libjpeg does, and the lowest bit sent so far.
    sent: Option<(i32, u8)>,
}

impl DcBits {
    /// Takes the DC quantisers of a DQT segment's body.
    pub(super) fn define_quant(&mut self, mut body: &[u8]) -> Option<()> {
        while !body.is_empty() {
            let precision = body[0] >> 4;
            let id = (body[0] & 15) as usize;
            if id > 3 || precision > 1 {
                return None;
            }
            let size = if precision == 0 { 64 } else { 128 };
            let first = if precision == 0 {
                *body.get(1)? as i32
            } else {
                u16::from_be_bytes([*body.get(1)?, *body.get(2)?]) as i32
            };
            body.get(1..1 + size)?;
            self.tables[id] = Some(first);
            body = &body[1 + size..];
        }
        Some(())
    }

    /// Takes the components of a frame header's body.
    pub(super) fn frame(&mut self, body: &[u8]) -> Option<()> {
        let count = *body.get(5)? as usize;
        self.components = (0..count)
            .map(|c| {
                let table = *body.get(8 + 3 * c)? as usize;
                (table < 4).then_some(ComponentBits {
                    id: *body.get(6 + 3 * c)?,
                    table,
                    sent: None,
                })
            })
            .collect::<Option<_>>()?;
        Some(())
    }

    /// Records a DC scan that has been read; `None` when it refines a
    /// component no scan has covered, or uses an undefined table.
    pub(super) fn scan(&mut self, header: &ScanHeader) -> Option<()> {
        let low_bit = header.approx & 15;
        for &(id, _, _) in &header.components {
            let component = self.components.iter_mut().find(|c| c.id == id)?;
            match &mut component.sent {
                Some((_, low)) => *low = low_bit,
                None if header.approx >> 4 == 0 => {
                    component.sent = Some((self.tables[component.table]?, low_bit));
                }
                None => return None,
            }
        }
        Some(())
    }

    /// The quantiser and lowest bit of frame component `index`, once a DC
    /// scan has covered it.
    fn of(&self, index: usize) -> Option<(i32, u8)> {
        self.components.get(index)?.sent
    }

    /// True when every component's DC is as precise as `precision` asks.
    pub(super) fn enough(&self, precision: Precision) -> bool {
        !self.components.is_empty()
            && self.components.iter().all(|c| {
                c.sent.is_some_and(|(quant, low)| {
                    i64::from(quant) * ((1i64 << low) - 1) <= i64::from(precision.0)
                })
            })
    }
}

/// An RGB image at 1/8 scale: `width x height` pixels, 3 bytes each.
pub struct Eighth {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

/// Decodes a Huffman-coded, 8-bit JPEG (progressive, or sequential without
/// 4:2:0 chroma) at 1/8 scale from its DC coefficients, to `precision`
/// (sequential files have every bit); `None` when the file is anything
/// else or does not
/// decode cleanly. `frame` is the width and height libjpeg-turbo read from
/// the file's header (which the caller checked against the pixel limit): a
/// frame of another size is declined before anything is allocated for it.
pub fn decode_eighth(jpeg: &[u8], precision: Precision, frame: (u32, u32)) -> Option<Eighth> {
    let mut state = State::default();
    if jpeg.get(..2)? != [0xff, 0xd8] {
        return None;
    }
    let mut i = 2;
    loop {
        // Once every component's DC coefficients hold the bits wanted, the
        // rest of the file (AC scans) adds nothing at this scale.
        if state.bits.enough(precision) {
            break;
        }
        let (marker, start, end) = segment(jpeg, i)?;
        if marker == 0xd9 {
            break;
        }
        let body = &jpeg[start + 4..end];
        i = end;
        match marker {
            // One frame per file, the one whose size the caller checked:
            // baseline, extended sequential or progressive, Huffman-coded.
            0xc0..=0xc2 if state.frame.is_none() => {
                let parsed = Frame::parse(body, frame)?;
                state.sequential = marker != 0xc2;
                if state.sequential && parsed.chroma_from_a_scaled_idct() {
                    return None;
                }
                state.frame = Some(parsed);
                state.bits.frame(body)?;
            }
            0xc0..=0xc3 | 0xc5..=0xc7 | 0xc9..=0xcb | 0xcd..=0xcf => return None,
            0xc4 => state.define_huffman(body)?,
            0xdb => state.bits.define_quant(body)?,
            0xdd => state.restart_interval = u16::from_be_bytes([*body.first()?, *body.get(1)?]),
            // Adobe: a transform flag of 0 means the channels are RGB.
            0xee if body.get(..5) == Some(b"Adobe") && body.get(11) == Some(&0) => return None,
            0xda => {
                let header = scan_header(body)?;
                let scan = Scan::parse(&header, state.frame.as_ref()?, state.sequential)?;
                i = if scan.spectral_start == 0 {
                    // A sequential scan holds every coefficient of its
                    // blocks; the AC ones are skipped.
                    let end = if state.sequential {
                        state.decode_dc_scan::<true>(&scan, jpeg, i)?
                    } else {
                        state.decode_dc_scan::<false>(&scan, jpeg, i)?
                    };
                    state.bits.scan(&header)?;
                    end
                } else {
                    scan_end(jpeg, i)?
                };
            }
            _ => {}
        }
    }
    state.finish()
}

/// Reads a progressive JPEG, whose first bytes are `head` and the rest come
/// from `rest`, keeping what an eighth-scale decode uses: every segment and
/// the DC scans, with the AC scans' data dropped as it streams past (through
/// one small buffer) and reading stopped once every component's DC is as
/// precise as `precision` asks. The result ends with EOI and decodes at 1/8
/// like the whole file. A file that stops making sense is kept up to that
/// point, for the decoder to report. If [`decode_eighth`] then declines the
/// file (RGB-coded, 12-bit), libjpeg-turbo decodes the cut without the
/// bits left out and without their midpoint: at most `quantiser x (2^Al -
/// 1) / 8` <= 1 level off.
pub fn read_dc_scans(
    head: Vec<u8>,
    rest: &mut dyn std::io::Read,
    precision: Precision,
) -> std::io::Result<Vec<u8>> {
    let mut input = Window {
        end: head.len(),
        buf: head,
        pos: 0,
        rest,
        eof: false,
    };
    let mut kept = Vec::with_capacity(1 << 19);
    let mut bits = DcBits::default();
    if input.ensure(2)? && input.bytes(2) == [0xff, 0xd8] {
        kept.extend_from_slice(input.bytes(2));
        input.pos += 2;
        loop {
            if bits.enough(precision) {
                break;
            }
            while input.ensure(2)? && input.bytes(2) == [0xff, 0xff] {
                input.pos += 1;
            }
            if !input.ensure(4)? || input.bytes(1)[0] != 0xff || input.bytes(2)[1] == 0xd9 {
                break;
            }
            // A marker without a length is kept as it is, for the decoder
            // to judge as libjpeg-turbo would (ours declines the file).
            if stands_alone(input.bytes(2)[1]) {
                kept.extend_from_slice(input.bytes(2));
                input.pos += 2;
                continue;
            }
            let head = input.bytes(4);
            let (marker, len) = (head[1], u16::from_be_bytes([head[2], head[3]]) as usize);
            if len < 2 || !input.ensure(2 + len)? {
                break;
            }
            let segment = input.bytes(2 + len).to_vec();
            kept.extend_from_slice(&segment);
            input.pos += 2 + len;
            let body = &segment[4..];
            // Tables or a frame that do not parse leave `bits` short of
            // enough, so the rest is read for the decoder to judge.
            match marker {
                0xc2 => _ = bits.frame(body),
                0xdb => _ = bits.define_quant(body),
                0xda => {
                    let Some(scan) = scan_header(body) else {
                        break;
                    };
                    let dc = scan.spectral_start == 0;
                    if !input.entropy_data(dc.then_some(&mut kept))? {
                        break;
                    }
                    if dc {
                        _ = bits.scan(&scan);
                    }
                }
                _ => {}
            }
        }
    }
    kept.extend_from_slice(&[0xff, 0xd9]);
    Ok(kept)
}

/// A read-ahead window over a stream: `buf[pos..end]` is read but not
/// consumed. The buffer is reused, not refilled with zeros, as data passes.
struct Window<'a> {
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    rest: &'a mut dyn std::io::Read,
    eof: bool,
}

impl Window<'_> {
    const CHUNK: usize = 1 << 18;

    /// Makes at least `n` unconsumed bytes available; false at end of stream.
    fn ensure(&mut self, n: usize) -> std::io::Result<bool> {
        while self.end - self.pos < n {
            if !self.more()? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Drops consumed bytes and reads up to one chunk more; false at end.
    fn more(&mut self) -> std::io::Result<bool> {
        if self.eof {
            return Ok(false);
        }
        self.buf.copy_within(self.pos..self.end, 0);
        self.end -= self.pos;
        self.pos = 0;
        if self.buf.len() < self.end + Self::CHUNK {
            self.buf.resize(self.end + Self::CHUNK, 0);
        }
        let read = loop {
            match self.rest.read(&mut self.buf[self.end..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        };
        self.end += read;
        self.eof = read == 0;
        Ok(read > 0)
    }

    fn bytes(&self, n: usize) -> &[u8] {
        &self.buf[self.pos..self.pos + n]
    }

    /// Consumes entropy-coded data up to the next marker other than a
    /// stuffed zero or a restart marker, appending it to `keep` if given;
    /// false when the stream ends first.
    fn entropy_data(&mut self, mut keep: Option<&mut Vec<u8>>) -> std::io::Result<bool> {
        loop {
            let found = memchr::memchr(0xff, &self.buf[self.pos..self.end]);
            let upto = found.map_or(self.end, |k| self.pos + k);
            if let Some(kept) = keep.as_deref_mut() {
                kept.extend_from_slice(&self.buf[self.pos..upto]);
            }
            self.pos = upto;
            if found.is_none() || !self.ensure(2)? {
                if !self.more()? {
                    return Ok(false);
                }
                continue;
            }
            let next = self.buf[self.pos + 1];
            if next != 0x00 && !(0xd0..=0xd7).contains(&next) {
                return Ok(true);
            }
            if let Some(kept) = keep.as_deref_mut() {
                kept.extend_from_slice(&self.buf[self.pos..self.pos + 2]);
            }
            self.pos += 2;
        }
    }
}

/// The marker segment at `at`, after any fill bytes: (marker, where its
/// 0xff is, where the segment ends). End of image is two bytes long.
/// `None` for a marker that stands alone (TEM or a restart marker, which
/// libjpeg-turbo steps over, or a second SOI, which it refuses): reading a
/// length after one, the two would see different segments (a frame hidden
/// from libjpeg-turbo's size check, for one), so the file is left to
/// libjpeg-turbo.
pub(super) fn segment(jpeg: &[u8], mut at: usize) -> Option<(u8, usize, usize)> {
    while *jpeg.get(at)? == 0xff && *jpeg.get(at + 1)? == 0xff {
        at += 1;
    }
    if *jpeg.get(at)? != 0xff {
        return None;
    }
    let marker = *jpeg.get(at + 1)?;
    if marker == 0xd9 {
        return Some((marker, at, at + 2));
    }
    if stands_alone(marker) {
        return None;
    }
    let len = u16::from_be_bytes([*jpeg.get(at + 2)?, *jpeg.get(at + 3)?]) as usize;
    let end = at + 2 + len;
    (len >= 2 && end <= jpeg.len()).then_some((marker, at, end))
}

/// The segments before the first scan, as (marker, body), stepping over
/// markers without a length (TEM, restart markers) as libjpeg-turbo does:
/// for reading metadata such as profiles and Adobe's marker, not for
/// decoding, where [`segment`] leaves such files to libjpeg-turbo.
pub(super) fn header_segments(jpeg: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut at = 2;
    std::iter::from_fn(move || {
        while jpeg.get(at) == Some(&0xff)
            && jpeg
                .get(at + 1)
                .is_some_and(|&m| m != 0xd8 && stands_alone(m))
        {
            at += 2;
        }
        let (marker, start, end) = segment(jpeg, at)?;
        if marker == 0xda || marker == 0xd9 {
            return None;
        }
        at = end;
        Some((marker, &jpeg[start + 4..end]))
    })
}

/// Markers without a length: TEM, the restart markers and SOI.
pub(super) fn stands_alone(marker: u8) -> bool {
    marker == 0x01 || (0xd0..=0xd8).contains(&marker)
}

/// Where the entropy-coded data starting at `from` ends: the next marker
/// other than a stuffed zero or a restart marker.
pub(super) fn scan_end(jpeg: &[u8], from: usize) -> Option<usize> {
    let mut end = from;
    loop {
        end += memchr::memchr(0xff, jpeg.get(end..)?)?;
        let next = *jpeg.get(end + 1)?;
        if next != 0x00 && !(0xd0..=0xd7).contains(&next) && next != 0xff {
            return Some(end);
        }
        end += if next == 0xff { 1 } else { 2 };
    }
}

struct Component {
    id: u8,
    h: usize,
    v: usize,
    /// DC coefficients, one per block, over the whole MCU grid.
    dc: Vec<i32>,
    /// Blocks per row of `dc`.
    stride: usize,
    /// Blocks that hold image data (a non-interleaved scan covers only these).
    blocks_wide: usize,
    blocks_high: usize,
}

struct Frame {
    width: usize,
    height: usize,
    h_max: usize,
    v_max: usize,
    mcus_wide: usize,
    mcus_high: usize,
    components: Vec<Component>,
}

/// The JPEG zigzag order: entry `k` is the natural (row-major) index of the
/// `k`th coefficient sent.
pub(super) const ZIGZAG: [usize; 64] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20,
    13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59,
    52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
];

/// Reads a DQT segment's tables into `tables`, in natural order.
pub(super) fn define_quantisers(
    mut body: &[u8],
    tables: &mut [Option<[u16; 64]>; 4],
) -> Option<()> {
    while let Some(&head) = body.first() {
        let (precision, id) = (head >> 4, (head & 15) as usize);
        if id > 3 || precision > 1 {
            return None;
        }
        let width = 1 + precision as usize;
        let values = body.get(1..1 + 64 * width)?;
        let mut table = [0u16; 64];
        for (k, &natural) in ZIGZAG.iter().enumerate() {
            table[natural] = if width == 1 {
                values[k] as u16
            } else {
                u16::from_be_bytes([values[2 * k], values[2 * k + 1]])
            };
        }
        tables[id] = Some(table);
        body = &body[1 + 64 * width..];
    }
    Some(())
}

/// An 8-bit frame header: its size, and per component (id, horizontal and
/// vertical sampling, quantiser table).
pub(super) struct FrameHeader {
    pub width: usize,
    pub height: usize,
    pub components: Vec<(u8, usize, usize, usize)>,
}

/// Parses a frame header's body; `None` for 12-bit samples, sampling
/// factors outside 1-4 or a quantiser table over 3.
pub(super) fn frame_header(body: &[u8]) -> Option<FrameHeader> {
    if *body.first()? != 8 {
        return None;
    }
    let height = u16::from_be_bytes([*body.get(1)?, *body.get(2)?]) as usize;
    let width = u16::from_be_bytes([*body.get(3)?, *body.get(4)?]) as usize;
    let count = *body.get(5)? as usize;
    let components = (0..count)
        .map(|c| {
            let at = 6 + 3 * c;
            let sampling = *body.get(at + 1)?;
            let (h, v) = ((sampling >> 4) as usize, (sampling & 15) as usize);
            let table = *body.get(at + 2)? as usize;
            ((1..=4).contains(&h) && (1..=4).contains(&v) && table < 4).then_some((
                *body.get(at)?,
                h,
                v,
                table,
            ))
        })
        .collect::<Option<_>>()?;
    Some(FrameHeader {
        width,
        height,
        components,
    })
}

impl Frame {
    /// Whether libjpeg-turbo decodes a chroma component at 1/8 scale with a
    /// 2x2 or larger IDCT rather than from its DC alone: when it is
    /// subsampled by two or more both ways (4:2:0), so that a block covers
    /// at least 2x2 pixels of the scaled image (`jdmaster.c`). Those blocks
    /// keep an in-block gradient that the DC alone would lose (up to 4 dB
    /// further from the full decode).
    fn chroma_from_a_scaled_idct(&self) -> bool {
        self.components
            .iter()
            .any(|c| self.h_max.is_multiple_of(2 * c.h) && self.v_max.is_multiple_of(2 * c.v))
    }

    /// The frame in `body`, if it is `expected` pixels wide and high (the
    /// size the caller checked), before anything is allocated for it.
    fn parse(body: &[u8], expected: (u32, u32)) -> Option<Frame> {
        let FrameHeader {
            width,
            height,
            components,
        } = frame_header(body)?;
        let count = components.len();
        let size = (u32::try_from(width).ok()?, u32::try_from(height).ok()?);
        if size != expected || width == 0 || height == 0 || !(count == 1 || count == 3) {
            return None;
        }
        let parts: Vec<(u8, usize, usize)> = components
            .into_iter()
            .map(|(id, h, v, _)| (id, h, v))
            .collect();
        // RGB-coded files name their components R, G, B.
        if count == 3 && parts.iter().map(|p| p.0).eq(*b"RGB") {
            return None;
        }
        let h_max = parts.iter().map(|p| p.1).max()?;
        let v_max = parts.iter().map(|p| p.2).max()?;
        // Chroma is repeated over whole pixels only for integer ratios.
        if parts.iter().any(|p| h_max % p.1 != 0 || v_max % p.2 != 0) {
            return None;
        }
        let mcus_wide = width.div_ceil(8 * h_max);
        let mcus_high = height.div_ceil(8 * v_max);
        let components = parts
            .into_iter()
            .map(|(id, h, v)| Component {
                id,
                h,
                v,
                dc: vec![0; mcus_wide * h * mcus_high * v],
                stride: mcus_wide * h,
                blocks_wide: (width * h).div_ceil(h_max).div_ceil(8),
                blocks_high: (height * v).div_ceil(v_max).div_ceil(8),
            })
            .collect();
        Some(Frame {
            width,
            height,
            h_max,
            v_max,
            mcus_wide,
            mcus_high,
            components,
        })
    }
}

/// A component's coefficients while a scan decodes into them.
struct Plane {
    index: usize,
    /// Blocks per MCU horizontally in this scan.
    h: usize,
    /// Plane entries per row of MCUs.
    row_step: usize,
    dc: Vec<i32>,
}

struct Scan {
    /// (index into the frame's components, DC table, AC table)
    components: Vec<(usize, usize, usize)>,
    spectral_start: u8,
    high_bit: u8,
    low_bit: u8,
}

/// The fields of a start-of-scan segment's body, before they are checked
/// against a frame.
pub(super) struct ScanHeader {
    /// (component id, DC table, AC table)
    pub components: Vec<(u8, u8, u8)>,
    pub spectral_start: u8,
    pub spectral_end: u8,
    /// Successive approximation: high bit in the upper four bits, low bit
    /// in the lower four.
    pub approx: u8,
}

pub(super) fn scan_header(body: &[u8]) -> Option<ScanHeader> {
    let count = *body.first()? as usize;
    let components = (0..count)
        .map(|c| {
            let tables = *body.get(2 + 2 * c)?;
            Some((*body.get(1 + 2 * c)?, tables >> 4, tables & 15))
        })
        .collect::<Option<Vec<_>>>()?;
    let at = 1 + 2 * count;
    Some(ScanHeader {
        components,
        spectral_start: *body.get(at)?,
        spectral_end: *body.get(at + 1)?,
        approx: *body.get(at + 2)?,
    })
}

impl Scan {
    /// The scan whose header is `header` in `frame`; `sequential` for a
    /// baseline or extended sequential frame.
    fn parse(header: &ScanHeader, frame: &Frame, sequential: bool) -> Option<Scan> {
        let count = header.components.len();
        if count == 0 || count > frame.components.len() {
            return None;
        }
        let mut components = Vec::with_capacity(count);
        for &(id, table, ac) in &header.components {
            let index = frame.components.iter().position(|k| k.id == id)?;
            // A progressive DC scan's AC table is not used (nor checked,
            // as libjpeg-turbo does not).
            if table > 3 || (sequential && ac > 3) {
                return None;
            }
            components.push((index, table as usize, ac as usize));
        }
        // A sequential scan holds every band at full precision; a
        // progressive DC scan the DC band alone.
        let last_band = if sequential { 63 } else { 0 };
        if header.spectral_start == 0 && header.spectral_end != last_band
            || sequential && (header.spectral_start != 0 || header.approx != 0)
        {
            return None;
        }
        Some(Scan {
            components,
            spectral_start: header.spectral_start,
            high_bit: header.approx >> 4,
            low_bit: header.approx & 15,
        })
    }
}

/// An AC table as defined, and the skip table built from it once a
/// sequential scan uses it: a progressive file's AC tables, or a file of
/// many definitions, cost no table builds.
struct AcTable {
    counts: [u8; 16],
    values: Vec<u8>,
    skip: Option<AcSkip>,
}

#[derive(Default)]
struct State {
    frame: Option<Frame>,
    /// Whether the frame is sequential (baseline or extended) rather than
    /// progressive.
    sequential: bool,
    dc_tables: [Option<Huffman>; 4],
    ac_tables: [Option<AcTable>; 4],
    bits: DcBits,
    restart_interval: u16,
}

impl State {
    fn define_huffman(&mut self, mut body: &[u8]) -> Option<()> {
        while !body.is_empty() {
            let class = body[0] >> 4;
            let id = (body[0] & 15) as usize;
            let counts: [u8; 16] = body.get(1..17)?.try_into().ok()?;
            let total: usize = counts.iter().map(|&c| c as usize).sum();
            let values = body.get(17..17 + total)?;
            if id > 3 || class > 1 {
                return None;
            }
            if class == 0 {
                self.dc_tables[id] = Some(Huffman::new(&counts, values)?);
            } else {
                self.ac_tables[id] = Some(AcTable {
                    counts,
                    values: values.to_vec(),
                    skip: None,
                });
            }
            body = &body[17 + total..];
        }
        Some(())
    }

    /// Decodes one DC scan whose entropy-coded data starts at `from`; returns
    /// where its data ends.
    /// `SEQUENTIAL` (the scan's) skips each block's AC coefficients after
    /// its DC; a separate copy, so that the progressive one stays as lean.
    fn decode_dc_scan<const SEQUENTIAL: bool>(
        &mut self,
        scan: &Scan,
        jpeg: &[u8],
        from: usize,
    ) -> Option<usize> {
        let frame = self.frame.as_mut()?;
        let refine = scan.high_bit != 0;
        if scan.low_bit > 13 || (refine && scan.high_bit != scan.low_bit + 1) {
            return None;
        }
        if SEQUENTIAL {
            for &(_, _, ac) in &scan.components {
                let table = self.ac_tables[ac].as_mut()?;
                if table.skip.is_none() {
                    table.skip = Some(AcSkip::new(&table.counts, &table.values)?);
                }
            }
        }
        let mut tables = Vec::with_capacity(scan.components.len());
        let mut skips = Vec::new();
        for &(index, table, ac) in &scan.components {
            if SEQUENTIAL {
                skips.push(self.ac_tables[ac].as_ref()?.skip.as_ref()?);
            }
            if !refine {
                tables.push(self.dc_tables[table].as_ref()?);
            } else if self.bits.of(index).is_none() {
                // A refinement before the first scan.
                return None;
            }
        }
        // Blocks in decoding order: MCU by MCU for an interleaved scan, the
        // component's own raster (image blocks only) for a single one. Each
        // block of an MCU is (slot in the scan, offset from the MCU's first
        // block in its component's plane).
        let interleaved = scan.components.len() > 1;
        let (mcus_wide, mcus_high) = if interleaved {
            (frame.mcus_wide, frame.mcus_high)
        } else {
            let c = &frame.components[scan.components[0].0];
            (c.blocks_wide, c.blocks_high)
        };
        let mut planes: Vec<Plane> = Vec::with_capacity(scan.components.len());
        let mut layout = Vec::new();
        for (slot, &(index, _, _)) in scan.components.iter().enumerate() {
            let (h, v) = if interleaved {
                (frame.components[index].h, frame.components[index].v)
            } else {
                (1, 1)
            };
            let stride = frame.components[index].stride;
            for by in 0..v {
                for bx in 0..h {
                    layout.push((slot, by * stride + bx));
                }
            }
            planes.push(Plane {
                index,
                h,
                row_step: v * stride,
                dc: Vec::new(),
            });
        }
        // Take each plane's coefficients out of the frame while decoding.
        for plane in &mut planes {
            plane.dc = std::mem::take(&mut frame.components[plane.index].dc);
        }
        let mut bits = BitReader::new(jpeg, from);
        let mut predictors = [0i32; 4];
        let interval = self.restart_interval as usize;
        let low_bit = scan.low_bit as u32;
        let mut mcu = 0usize;
        let mut ok = true;
        'rows: for my in 0..mcus_high {
            // Past the scan's data the reader supplies zeros: a file cut
            // short (or a frame far larger than its data) is given up on
            // here, a row at most later, not after decoding zeros for
            // every block left.
            if bits.read_past_end() {
                ok = false;
                break;
            }
            for mx in 0..mcus_wide {
                if interval > 0 && mcu > 0 && mcu.is_multiple_of(interval) {
                    if bits.restart().is_none() {
                        ok = false;
                        break 'rows;
                    }
                    predictors = [0; 4];
                }
                mcu += 1;
                for &(slot, offset) in &layout {
                    let plane = &mut planes[slot];
                    let at = my * plane.row_step + mx * plane.h + offset;
                    let Some(value) = plane.dc.get_mut(at) else {
                        ok = false;
                        break 'rows;
                    };
                    if refine {
                        if bits.bit() {
                            *value |= 1 << low_bit;
                        }
                        continue;
                    }
                    let diff = tables[slot]
                        .decode(&mut bits)
                        .and_then(|size| bits.receive_extend(size));
                    let Some(diff) = diff else {
                        ok = false;
                        break 'rows;
                    };
                    predictors[slot] = predictors[slot].wrapping_add(diff);
                    *value = predictors[slot].wrapping_shl(low_bit);
                    if SEQUENTIAL
                        && let Some(skip) = skips.get(slot)
                        && skip.skip(&mut bits).is_none()
                    {
                        ok = false;
                        break 'rows;
                    }
                }
            }
        }
        for plane in planes {
            frame.components[plane.index].dc = plane.dc;
        }
        if !ok {
            return None;
        }
        if bits.read_past_end() {
            return None;
        }
        scan_end(jpeg, bits.position())
    }

    fn finish(self) -> Option<Eighth> {
        let frame = self.frame?;
        let width = frame.width.div_ceil(8);
        let height = frame.height.div_ceil(8);
        // Each component's samples at 1/8 scale, repeated over the pixels
        // its block covers when it is subsampled.
        let mut planes = Vec::with_capacity(frame.components.len());
        for (index, c) in frame.components.iter().enumerate() {
            let (quant, low_bit) = self.bits.of(index)?;
            // Bits not sent yet take the middle of their range: in half
            // coefficient units, 2^low_bit - 1. With every bit this is
            // libjpeg's (dc * quant + 4) >> 3.
            let missing = (1i32 << low_bit) - 1;
            let sample = |dc: i32| {
                let twice = dc.wrapping_mul(2).wrapping_add(missing);
                let value = (twice.wrapping_mul(quant).wrapping_add(8) >> 4) + 128;
                value.clamp(0, 255) as u8
            };
            let (dx, dy) = (frame.h_max / c.h, frame.v_max / c.v);
            let mut plane = Vec::with_capacity(width * height + dx);
            for y in 0..height {
                let start = plane.len();
                if y % dy != 0 {
                    // The same blocks as the row above.
                    plane.extend_from_within(start - width..start);
                    continue;
                }
                let row = c.dc.get((y / dy) * c.stride..)?;
                let blocks = row.get(..width.div_ceil(dx))?;
                if dx == 1 {
                    plane.extend(blocks.iter().map(|&dc| sample(dc)));
                } else {
                    for &dc in blocks {
                        let value = sample(dc);
                        plane.extend(std::iter::repeat_n(value, dx));
                    }
                    plane.truncate(start + width);
                }
            }
            planes.push(plane);
        }
        let mut rgb = vec![0u8; width * height * 3];
        match planes.as_slice() {
            [luma] => {
                for (pixel, &l) in rgb.chunks_exact_mut(3).zip(luma) {
                    pixel.copy_from_slice(&[l, l, l]);
                }
            }
            [y, cb, cr] => {
                for (((pixel, &y), &cb), &cr) in rgb.chunks_exact_mut(3).zip(y).zip(cb).zip(cr) {
                    pixel.copy_from_slice(&ycc_to_rgb(y, cb, cr));
                }
            }
            _ => return None,
        }
        Some(Eighth {
            width: width as u32,
            height: height as u32,
            rgb,
        })
    }
}

/// libjpeg's YCbCr to RGB conversion (jdcolor.c), in 16-bit fixed point.
pub(super) fn ycc_to_rgb(y: u8, cb: u8, cr: u8) -> [u8; 3] {
    const ONE_HALF: i32 = 1 << 15;
    const fn fix(x: f64) -> i32 {
        (x * 65536.0 + 0.5) as i32
    }
    let (y, cb, cr) = (y as i32, cb as i32 - 128, cr as i32 - 128);
    let r = y + ((fix(1.40200) * cr + ONE_HALF) >> 16);
    let g = y + ((-fix(0.34414) * cb - fix(0.71414) * cr + ONE_HALF) >> 16);
    let b = y + ((fix(1.77200) * cb + ONE_HALF) >> 16);
    [
        r.clamp(0, 255) as u8,
        g.clamp(0, 255) as u8,
        b.clamp(0, 255) as u8,
    ]
}

/// A canonical Huffman table: a lookup on the next 9 bits for short codes,
/// then the largest code of each longer length.
pub(super) struct Huffman {
    /// (code length << 8 | symbol); 0 where no code of 9 bits or fewer starts.
    fast: Vec<u16>,
    /// Per length 1..=16: the largest code, or -1.
    max_code: [i32; 17],
    /// Per length: the index into `values` of its first code, minus that code.
    offset: [i32; 17],
    values: Vec<u8>,
}

const FAST_BITS: u32 = 9;

/// Each code of a canonical Huffman table, in order, as (length, code,
/// symbol), up to codes of `max_len` bits; `None` for a table whose counts
/// overflow their lengths or outrun its values.
fn canonical_codes(
    counts: &[u8; 16],
    values: &[u8],
    max_len: u32,
) -> Option<Vec<(u32, usize, u8)>> {
    let mut codes = Vec::with_capacity(values.len());
    let mut code = 0usize;
    for len in 1..=max_len {
        for _ in 0..counts[len as usize - 1] {
            if code >= 1 << len {
                return None;
            }
            codes.push((len, code, *values.get(codes.len())?));
            code += 1;
        }
        code <<= 1;
    }
    Some(codes)
}

impl Huffman {
    pub(super) fn new(counts: &[u8; 16], values: &[u8]) -> Option<Huffman> {
        let mut fast = vec![0u16; 1 << FAST_BITS];
        let mut max_code = [-1i32; 17];
        let mut offset = [0i32; 17];
        for (k, (len, code, symbol)) in canonical_codes(counts, values, 16)?.into_iter().enumerate()
        {
            let at = len as usize;
            if max_code[at] < 0 {
                offset[at] = k as i32 - code as i32;
            }
            max_code[at] = code as i32;
            if len <= FAST_BITS {
                let shift = FAST_BITS - len;
                let start = code << shift;
                let entry = ((len as u16) << 8) | u16::from(symbol);
                fast[start..start + (1 << shift)].fill(entry);
            }
        }
        Some(Huffman {
            fast,
            max_code,
            offset,
            values: values.to_vec(),
        })
    }

    #[inline]
    pub(super) fn decode(&self, bits: &mut BitReader<'_>) -> Option<u32> {
        bits.fill();
        let entry = self.fast[bits.peek(FAST_BITS) as usize];
        if entry != 0 {
            bits.consume(u32::from(entry >> 8));
            return Some(u32::from(entry & 0xff));
        }
        for len in FAST_BITS + 1..=16 {
            let code = bits.peek(len) as i32;
            if code <= self.max_code[len as usize] {
                bits.consume(len);
                let index = (self.offset[len as usize] + code) as usize;
                return self.values.get(index).map(|&v| u32::from(v));
            }
        }
        None
    }
}

/// Skips the AC coefficients of a sequential scan's blocks with one lookup
/// per coefficient for most of them: the table maps the next [`AC_BITS`]
/// bits to the code's length plus its value's, and to how far the
/// coefficient index moves. libjpeg-turbo, which has no use for the values
/// at 1/8 scale either, looks up the code and then drops the value's bits
/// in a second step.
pub(super) struct AcSkip {
    /// Bits 0-7: the code's length plus its value's; 8-15: coefficients
    /// passed (0 for end of block). 0 where the code is longer than
    /// [`AC_BITS`].
    fast: Box<[u32; 1 << AC_BITS]>,
    /// For codes longer than [`AC_BITS`].
    huffman: Huffman,
}

const AC_BITS: u32 = 11;

/// How far an AC code's (run, size) moves the coefficient index, as
/// libjpeg reads it: a size of 0 ends the block, except a run of 15
/// (sixteen zeros); 0 for the end.
fn ac_passed(run: u32, size: u32) -> u32 {
    match (run, size) {
        (15, 0) => 16,
        (_, 0) => 0,
        _ => run + 1,
    }
}

impl AcSkip {
    fn new(counts: &[u8; 16], values: &[u8]) -> Option<AcSkip> {
        let mut fast = Box::new([0u32; 1 << AC_BITS]);
        for (len, code, symbol) in canonical_codes(counts, values, AC_BITS)? {
            let (run, size) = (u32::from(symbol >> 4), u32::from(symbol & 15));
            let shift = AC_BITS - len;
            let start = code << shift;
            fast[start..start + (1 << shift)].fill((len + size) | ac_passed(run, size) << 8);
        }
        Some(AcSkip {
            fast,
            huffman: Huffman::new(counts, values)?,
        })
    }

    /// Skips one block's AC coefficients; `None` for a code not in the
    /// table.
    #[inline]
    fn skip(&self, bits: &mut BitReader<'_>) -> Option<()> {
        let mut k = 1;
        // The buffer is kept in locals, written back around the calls.
        let (mut acc, mut count) = (bits.acc, bits.count);
        while k < 64 {
            // A code of the table and its value take at most 26 bits.
            if count < 32 {
                (bits.acc, bits.count) = (acc, count);
                bits.refill();
                (acc, count) = (bits.acc, bits.count);
            }
            let entry = self.fast[(acc >> (64 - AC_BITS)) as usize];
            let passed = if entry != 0 {
                let length = entry & 0xff;
                acc <<= length;
                count -= length;
                entry >> 8
            } else {
                (bits.acc, bits.count) = (acc, count);
                let symbol = self.huffman.decode(bits)?;
                let (run, size) = (symbol >> 4, symbol & 15);
                bits.take(size);
                (acc, count) = (bits.acc, bits.count);
                ac_passed(run, size)
            };
            if passed == 0 {
                break;
            }
            k += passed;
        }
        (bits.acc, bits.count) = (acc, count);
        Some(())
    }
}

/// Reads entropy-coded bits, undoing 0xff00 stuffing; at a marker it stops
/// and supplies zeros, counting them, so a scan that runs short is noticed.
pub(super) struct BitReader<'a> {
    data: &'a [u8],
    pos: usize,
    /// Bits not yet consumed, most significant first.
    acc: u64,
    count: u32,
    /// Zero bytes supplied after a marker or the end of the data.
    padding: u32,
}

impl<'a> BitReader<'a> {
    pub(super) fn new(data: &'a [u8], pos: usize) -> Self {
        BitReader {
            data,
            pos,
            acc: 0,
            count: 0,
            padding: 0,
        }
    }

    /// Makes sure of 32 bits in the buffer (the most any read takes),
    /// topping it up to more than 56 when it has fewer: refills then come
    /// every few codes, several bytes at a time.
    #[inline]
    fn fill(&mut self) {
        if self.count < 32 {
            self.refill();
        }
    }

    /// Tops the buffer up to more than 56 bits.
    fn refill(&mut self) {
        // Whole bytes at once while none of them is 0xff (stuffing or a
        // marker, which the loop below handles byte by byte).
        if self.padding == 0
            && let Some(chunk) = self.data.get(self.pos..self.pos + 8)
            && let Ok(chunk) = <[u8; 8]>::try_from(chunk)
        {
            let word = u64::from_be_bytes(chunk);
            let bytes = (64 - self.count) / 8;
            let mask = !u64::MAX.checked_shr(8 * bytes).unwrap_or(0);
            // A set high bit for each 0xff byte (and, harmlessly, maybe
            // for bytes before one).
            let inverted = !word;
            let ff =
                inverted.wrapping_sub(0x0101_0101_0101_0101) & !inverted & 0x8080_8080_8080_8080;
            if ff & mask == 0 {
                self.acc |= (word & mask) >> self.count;
                self.count += 8 * bytes;
                self.pos += bytes as usize;
                return;
            }
        }
        while self.count <= 56 {
            let byte = if self.padding > 0 {
                self.padding += 1;
                0
            } else {
                match (self.data.get(self.pos), self.data.get(self.pos + 1)) {
                    (Some(0xff), Some(0x00)) => {
                        self.pos += 2;
                        0xff
                    }
                    (Some(0xff), _) | (None, _) => {
                        self.padding = 1;
                        0
                    }
                    (Some(&b), _) => {
                        self.pos += 1;
                        b
                    }
                }
            };
            self.acc |= u64::from(byte) << (56 - self.count);
            self.count += 8;
        }
    }

    #[inline]
    fn peek(&self, n: u32) -> u64 {
        self.acc >> (64 - n)
    }

    #[inline]
    fn consume(&mut self, n: u32) {
        self.acc <<= n;
        self.count -= n;
    }

    #[inline]
    pub(super) fn bit(&mut self) -> bool {
        if self.count == 0 {
            self.fill();
        }
        let set = self.acc >> 63 == 1;
        self.consume(1);
        set
    }

    /// The next `n` bits (at most 32) as an unsigned number.
    #[inline]
    pub(super) fn take(&mut self, n: u32) -> u32 {
        if n == 0 {
            return 0;
        }
        if self.count < n {
            self.fill();
        }
        let v = self.peek(n) as u32;
        self.consume(n);
        v
    }

    /// Reads `size` bits as a signed DC difference (JPEG's EXTEND).
    #[inline]
    pub(super) fn receive_extend(&mut self, size: u32) -> Option<i32> {
        if size == 0 {
            return Some(0);
        }
        if size > 16 {
            return None;
        }
        self.fill();
        let raw = self.peek(size) as i32;
        self.consume(size);
        Some(if raw < 1 << (size - 1) {
            raw - (1 << size) + 1
        } else {
            raw
        })
    }

    /// True when bits past the scan's data were consumed.
    pub(super) fn read_past_end(&self) -> bool {
        // In u64: a long run of padding (a hostile file) would overflow u32.
        u64::from(self.padding) * 8 > u64::from(self.count)
    }

    /// The first byte not yet taken into the bit buffer.
    pub(super) fn position(&self) -> usize {
        self.pos
    }

    /// Skips to the next restart marker and starts a fresh byte after it.
    pub(super) fn restart(&mut self) -> Option<()> {
        if self.read_past_end() {
            return None;
        }
        let mut at = self.pos;
        while self.data.get(at) == Some(&0xff) && self.data.get(at + 1) == Some(&0xff) {
            at += 1;
        }
        if self.data.get(at) != Some(&0xff) || !(0xd0..=0xd7).contains(self.data.get(at + 1)?) {
            return None;
        }
        self.pos = at + 2;
        self.acc = 0;
        self.count = 0;
        self.padding = 0;
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_codes_decode() {
        // Lengths 2, 2, 3, 3: codes 00, 01, 100, 101.
        let mut counts = [0u8; 16];
        counts[1] = 2;
        counts[2] = 2;
        let table = Huffman::new(&counts, &[5, 6, 7, 8]).unwrap();
        // 01 100 101 00 -> 6 7 8 5, then padding.
        let data = [0b0110_0101, 0b0000_0000];
        let mut bits = BitReader::new(&data, 0);
        let got: Vec<u32> = (0..4).map(|_| table.decode(&mut bits).unwrap()).collect();
        assert_eq!(got, [6, 7, 8, 5]);
    }

    #[test]
    fn stuffed_bytes_and_markers() {
        let data = [0xff, 0x00, 0x80, 0xff, 0xd9];
        let mut bits = BitReader::new(&data, 0);
        let first: Vec<bool> = (0..9).map(|_| bits.bit()).collect();
        assert_eq!(first, [true; 9]);
        assert!(!bits.read_past_end());
        for _ in 0..7 {
            assert!(!bits.bit());
        }
        assert!(!bits.read_past_end());
        assert!(!bits.bit());
        assert!(bits.read_past_end());
        assert_eq!(bits.position(), 3);
    }

    #[test]
    fn extend_gives_signed_differences() {
        let data = [0b0111_1000];
        let mut bits = BitReader::new(&data, 0);
        // size 3: 011 -> -4; size 2: 11 -> 3.
        assert_eq!(bits.receive_extend(3), Some(-4));
        assert_eq!(bits.receive_extend(2), Some(3));
    }

    #[test]
    fn colour_conversion_matches_libjpeg_at_the_extremes() {
        assert_eq!(ycc_to_rgb(0, 128, 128), [0, 0, 0]);
        assert_eq!(ycc_to_rgb(255, 128, 128), [255, 255, 255]);
        assert_eq!(ycc_to_rgb(76, 85, 255), [254, 0, 0]);
    }
}
