//! Small binary media built from scratch, valid enough for a client to decode: PCM16 tones,
//! WAV files, silent MP3 frames and PNG images.
//!
//! The PNG encoder writes its image data as *stored* (uncompressed) deflate blocks inside the
//! zlib stream, which every inflater accepts; the images are a few pixels, so size does not
//! matter, and no compression library is needed.

/// Sample rate of generated speech and realtime audio (mono PCM16), as the service uses.
pub(crate) const SPEECH_SAMPLE_RATE: u32 = 24_000;

/// `samples` mono PCM16 little-endian samples of a quiet 440 Hz tone at `rate` Hz.
pub(crate) fn pcm16_tone(samples: usize, rate: u32) -> Vec<u8> {
    let step = std::f64::consts::TAU * 440.0 / f64::from(rate.max(1));
    let mut out = Vec::with_capacity(samples * 2);
    for i in 0..samples {
        // About -20 dBFS: audible, never clipping.
        let v = ((i as f64 * step).sin() * 3_000.0) as i16;
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// A RIFF/WAVE file around mono PCM16 `pcm` at `rate` Hz (the canonical 44-byte header).
pub(crate) fn wav(pcm: &[u8], rate: u32) -> Vec<u8> {
    let data_len = u32::try_from(pcm.len()).unwrap_or(u32::MAX - 36);
    let mut out = Vec::with_capacity(44 + pcm.len());
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data_len).to_le_bytes());
    out.extend_from_slice(b"WAVE");
    out.extend_from_slice(b"fmt ");
    out.extend_from_slice(&16u32.to_le_bytes()); // fmt chunk size
    out.extend_from_slice(&1u16.to_le_bytes()); // linear PCM
    out.extend_from_slice(&1u16.to_le_bytes()); // one channel
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&(rate * 2).to_le_bytes()); // bytes per second
    out.extend_from_slice(&2u16.to_le_bytes()); // bytes per sample frame
    out.extend_from_slice(&16u16.to_le_bytes()); // bits per sample
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data_len.to_le_bytes());
    out.extend_from_slice(pcm);
    out
}

/// Length of one generated MP3 frame: MPEG-1 Layer III, 128 kbit/s, 48 kHz, no padding
/// (144 * 128000 / 48000).
pub(crate) const MP3_FRAME_BYTES: usize = 384;
/// Play time of one frame (1152 samples at 48 kHz).
pub(crate) const MP3_FRAME_MS: u64 = 24;
/// The frame header: sync, MPEG-1, Layer III, no CRC; 128 kbit/s, 48 kHz; mono.
const MP3_HEADER: [u8; 4] = [0xFF, 0xFB, 0x94, 0xC0];

/// `frames` silent MP3 frames: each a valid header followed by zeroed side information and
/// main data (no Huffman-coded values, so decoders play silence).
pub(crate) fn mp3_silence(frames: usize) -> Vec<u8> {
    let mut out = vec![0u8; frames * MP3_FRAME_BYTES];
    for frame in out.chunks_exact_mut(MP3_FRAME_BYTES) {
        frame[..4].copy_from_slice(&MP3_HEADER);
    }
    out
}

/// An 8-bit RGB PNG of `width` x `height` pixels, each colored by `pixel(x, y)`.
pub(crate) fn png_rgb(width: u32, height: u32, pixel: impl Fn(u32, u32) -> [u8; 3]) -> Vec<u8> {
    let mut raw = Vec::with_capacity((height as usize) * (1 + 3 * width as usize));
    for y in 0..height {
        raw.push(0); // filter type None
        for x in 0..width {
            raw.extend_from_slice(&pixel(x, y));
        }
    }
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    // Bit depth 8, color type 2 (RGB), deflate, adaptive filtering, no interlace.
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);

    let mut out = Vec::with_capacity(raw.len() + 128);
    out.extend_from_slice(b"\x89PNG\r\n\x1a\n");
    png_chunk(&mut out, b"IHDR", &ihdr);
    png_chunk(&mut out, b"IDAT", &zlib_stored(&raw));
    png_chunk(&mut out, b"IEND", &[]);
    out
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    out.extend_from_slice(&crc32(&[kind, data]).to_be_bytes());
}

/// A zlib stream (RFC 1950) holding `data` in stored deflate blocks (RFC 1951, BTYPE 00).
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    const MAX_BLOCK: usize = 65_535;
    let mut out = Vec::with_capacity(data.len() + 16 + 5 * (data.len() / MAX_BLOCK));
    // CMF: deflate with a 32 KiB window; FLG: no dictionary, fastest level, check bits so
    // that CMF * 256 + FLG is a multiple of 31.
    out.extend_from_slice(&[0x78, 0x01]);
    let mut blocks = data.chunks(MAX_BLOCK).peekable();
    if blocks.peek().is_none() {
        // One empty final block.
        out.extend_from_slice(&[1, 0, 0, 0xFF, 0xFF]);
    }
    while let Some(block) = blocks.next() {
        let last = blocks.peek().is_none();
        out.push(u8::from(last)); // BFINAL, BTYPE = 00, rest of the byte unused
        let len = block.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(block);
    }
    out.extend_from_slice(&adler32(data).to_be_bytes());
    out
}

/// CRC-32 (ISO-HDLC, as PNG uses) over the concatenation of `parts`.
pub(crate) fn crc32(parts: &[&[u8]]) -> u32 {
    let mut crc = !0u32;
    for part in parts {
        for &byte in *part {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                let mask = (crc & 1).wrapping_neg();
                crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
            }
        }
    }
    !crc
}

/// Adler-32, the zlib trailer checksum.
fn adler32(data: &[u8]) -> u32 {
    const MOD: u32 = 65_521;
    let (mut a, mut b) = (1u32, 0u32);
    // 5552 bytes is the most that can be summed before the u32 sums could overflow.
    for chunk in data.chunks(5_552) {
        for &byte in chunk {
            a += u32::from(byte);
            b += a;
        }
        a %= MOD;
        b %= MOD;
    }
    (b << 16) | a
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    #[test]
    fn checksums_match_known_values() {
        assert_eq!(crc32(&[b"123456789"]), 0xCBF4_3926);
        assert_eq!(crc32(&[b"1234", b"56789"]), crc32fast::hash(b"123456789"));
        assert_eq!(crc32(&[b"IEND"]), 0xAE42_6082);
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
        assert_eq!(adler32(b""), 1);
        let big = vec![0xFFu8; 100_000];
        let mut a = 1u64;
        let mut b = 0u64;
        for &x in &big {
            a = (a + u64::from(x)) % 65_521;
            b = (b + a) % 65_521;
        }
        assert_eq!(u64::from(adler32(&big)), (b << 16) | a);
    }

    fn inflate(zlib: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::ZlibDecoder::new(zlib)
            .read_to_end(&mut out)
            .expect("valid zlib stream");
        out
    }

    #[test]
    fn zlib_stored_streams_inflate() {
        for len in [0usize, 1, 65_535, 65_536, 200_000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            assert_eq!(inflate(&zlib_stored(&data)), data, "length {len}");
        }
    }

    #[test]
    fn png_chunks_and_pixels_decode() {
        let png = png_rgb(3, 2, |x, y| [x as u8 * 10, y as u8 * 20, 7]);
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let mut pos = 8;
        let mut chunks = Vec::new();
        while pos < png.len() {
            let len = u32::from_be_bytes(png[pos..pos + 4].try_into().unwrap()) as usize;
            let kind = &png[pos + 4..pos + 8];
            let data = &png[pos + 8..pos + 8 + len];
            let crc = u32::from_be_bytes(png[pos + 8 + len..pos + 12 + len].try_into().unwrap());
            let mut h = crc32fast::Hasher::new();
            h.update(kind);
            h.update(data);
            assert_eq!(h.finalize(), crc, "{:?}", String::from_utf8_lossy(kind));
            chunks.push((kind.to_vec(), data.to_vec()));
            pos += 12 + len;
        }
        let kinds: Vec<&[u8]> = chunks.iter().map(|(k, _)| k.as_slice()).collect();
        assert_eq!(kinds, [b"IHDR".as_slice(), b"IDAT", b"IEND"]);
        assert_eq!(chunks[0].1, [0, 0, 0, 3, 0, 0, 0, 2, 8, 2, 0, 0, 0]);
        let raw = inflate(&chunks[1].1);
        assert_eq!(
            raw,
            [
                0, 0, 0, 7, 10, 0, 7, 20, 0, 7, //
                0, 0, 20, 7, 10, 20, 7, 20, 20, 7,
            ]
        );
    }

    #[test]
    fn wav_header_describes_the_samples() {
        let pcm = pcm16_tone(240, SPEECH_SAMPLE_RATE);
        assert_eq!(pcm.len(), 480);
        assert!(pcm.chunks(2).any(|s| s != [0, 0]), "a tone, not silence");
        let w = wav(&pcm, SPEECH_SAMPLE_RATE);
        assert_eq!(w.len(), 44 + 480);
        assert_eq!(&w[0..4], b"RIFF");
        assert_eq!(u32::from_le_bytes(w[4..8].try_into().unwrap()), 36 + 480);
        assert_eq!(&w[8..16], b"WAVEfmt ");
        assert_eq!(u16::from_le_bytes([w[20], w[21]]), 1);
        assert_eq!(u32::from_le_bytes(w[24..28].try_into().unwrap()), 24_000);
        assert_eq!(u32::from_le_bytes(w[28..32].try_into().unwrap()), 48_000);
        assert_eq!(&w[36..40], b"data");
        assert_eq!(u32::from_le_bytes(w[40..44].try_into().unwrap()), 480);
        assert_eq!(&w[44..], pcm.as_slice());
    }

    #[test]
    fn mp3_frames_have_headers_at_frame_boundaries() {
        let m = mp3_silence(3);
        assert_eq!(m.len(), 3 * MP3_FRAME_BYTES);
        for frame in m.chunks(MP3_FRAME_BYTES) {
            assert_eq!(frame[..4], MP3_HEADER);
            // 11 sync bits set.
            assert_eq!(frame[0], 0xFF);
            assert_eq!(frame[1] & 0xE0, 0xE0);
        }
        assert!(mp3_silence(0).is_empty());
    }
}
