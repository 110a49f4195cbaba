//! A passive reader of one direction of a relayed WebSocket connection, for Azure OpenAI's
//! Realtime API: frames are parsed as the bytes pass (the bytes themselves are never changed),
//! and the few server events the gateway acts on are reported.
//!
//! # How it reads
//!
//! A [`RealtimeScanner`] is fed the bytes of one direction, after the HTTP upgrade, in whatever
//! chunks the connection delivers them (a frame header may be split anywhere). It parses
//! RFC 6455 frames — FIN, the opcode, 7/16/64-bit lengths, the mask key — and follows text
//! messages across fragments, with control frames allowed between them.
//!
//! For each text message it reads the `type` member from the message's first bytes (at most
//! [`TYPE_PREFIX_BYTES`], unmasked into a fixed buffer): Azure's events are JSON objects whose
//! first member is normally `"type"`, and any members before it are skipped as long as they end
//! within the prefix. Whitespace is allowed anywhere JSON allows it. Only three types are read
//! further:
//!
//! * `response.done`: the whole message is kept (at most `max_message` bytes) and parsed for
//!   the response's `status` and `usage` ([`RealtimeEvent::ResponseDone`]);
//! * `error`: kept and parsed for `error.code` ([`RealtimeEvent::Error`]);
//! * `response.created`: nothing more is kept; [`RealtimeEvent::ResponseCreated`] is reported
//!   when the message ends.
//!
//! Every other message — above all `response.audio.delta` and `input_audio_buffer.append`,
//! tens of kilobytes of base64 each — is skipped once its type is known: its remaining bytes are
//! not copied, not unmasked, not even looked at (constant work per chunk), and nothing is
//! allocated for it. When the prefix does not tell the type (the `type` member comes after
//! [`TYPE_PREFIX_BYTES`] bytes, or a key before it is written with escapes), the message is kept
//! whole, up to `max_message` bytes, and its type is taken from a full parse.
//!
//! Binary messages, pings and pongs are skipped without an event. Close frames are reported
//! ([`RealtimeEvent::Close`]); the scanner keeps reading after one.
//!
//! # Memory
//!
//! The scanner holds a frame header (14 bytes), a control frame's payload (125 bytes), the
//! type prefix ([`TYPE_PREFIX_BYTES`]) and one message buffer that only a message being kept
//! uses; a kept message longer than `max_message` is dropped as soon as it outgrows the bound
//! ([`RealtimeEvent::Oversized`]) and the buffer is released. A buffer that grew beyond 16 KiB
//! is released once its message is handled; a smaller one is reused.
//!
//! # Errors
//!
//! Framing the scanner cannot follow (see [`ProtocolViolation`]) is reported once as
//! [`RealtimeEvent::ProtocolError`]; the scanner then ignores the rest of the connection. Note
//! that compressed frames (the `permessage-deflate` extension sets RSV1) are such a violation:
//! a gateway that wants to read the events must keep extensions from being negotiated (strip
//! `Sec-WebSocket-Extensions` from the client's upgrade request). The scanner is lenient where
//! leniency costs nothing: masking is accepted in either direction, lengths need not use their
//! shortest form, text is not checked to be UTF-8, and a close frame with a 1-byte payload
//! reports no code.

use std::fmt;

use bytes::Bytes;
use memchr::memchr2;
use serde::Deserialize;

use crate::Usage;
use crate::lenient::{Detail, Text};
use crate::usage::short_code;

/// The most bytes of a text message's start read to find its `type`.
pub const TYPE_PREFIX_BYTES: usize = 256;
/// A message buffer that grew beyond this is released once its message is handled.
const KEEP_CAPACITY: usize = 16 * 1024;
/// The longest control frame payload (RFC 6455 section 5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;
/// The longest frame header: 2 bytes, a 64-bit length and a mask key.
const MAX_HEADER: usize = 14;
/// The longest close reason that fits a control frame after the 2-byte code.
const MAX_CLOSE_REASON: usize = MAX_CONTROL_PAYLOAD - 2;

const OP_CONTINUATION: u8 = 0;
const OP_TEXT: u8 = 1;
const OP_BINARY: u8 = 2;
const OP_CLOSE: u8 = 8;
const OP_PING: u8 = 9;
const OP_PONG: u8 = 10;

/// Something the scanner found, reported as soon as it is complete (a message event when the
/// message's last frame ends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RealtimeEvent {
    /// A `response.created` event: the server started a response.
    ResponseCreated {
        /// Where the message ends in the chunk just fed: `chunk[..end]` completes it (its final
        /// frame included, nothing after it). A gateway that must stop the server's output at
        /// this response relays `chunk[..end]`, then its own close frame.
        end: usize,
    },
    /// A `response.done` event: a response ended (completed, cancelled, failed or incomplete).
    ResponseDone {
        /// From `response.usage`: `input_tokens` as prompt tokens, `output_tokens` as
        /// completion tokens, `total_tokens` as reported else their sum. `None` when there is
        /// no usage object, it has none of the three counts, or the event could not be parsed.
        usage: Option<Usage>,
        /// The usage's breakdown, when `usage` is `Some` and it has `input_token_details` or
        /// `output_token_details`.
        details: Option<RealtimeTokenDetails>,
        /// `response.status` (e.g. `completed`, `cancelled`, `failed`, `incomplete`), cut to at
        /// most 64 bytes at a character boundary.
        status: Option<String>,
    },
    /// An `error` event.
    Error {
        /// `error.code`, when it is a string or an integer, cut to at most 64 bytes at a
        /// character boundary. The message is never read: it may quote the client's input.
        code: Option<String>,
    },
    /// A text message that had to be kept was longer than the scanner's `max_message`: it was
    /// skipped from that point on and reported no other event.
    Oversized {
        /// `Some("response.done")` or `Some("error")` when the prefix told the type; `None` for
        /// a message whose type was not found in its prefix (of any type).
        event_type: Option<&'static str>,
    },
    /// A close frame.
    Close {
        /// The status code, when the frame has one (a payload of at least 2 bytes).
        code: Option<u16>,
    },
    /// The bytes broke the framing rules: the scanner has stopped reading (this is its last
    /// event).
    ProtocolError(ProtocolViolation),
}

/// The token breakdown of a Realtime `response.done` usage; a count that is absent is 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RealtimeTokenDetails {
    /// `input_token_details.text_tokens`
    pub input_text_tokens: u64,
    /// `input_token_details.audio_tokens`
    pub input_audio_tokens: u64,
    /// `input_token_details.cached_tokens` (part of the input tokens)
    pub input_cached_tokens: u64,
    /// `output_token_details.text_tokens`
    pub output_text_tokens: u64,
    /// `output_token_details.audio_tokens`
    pub output_audio_tokens: u64,
}

/// A framing error that stops a [`RealtimeScanner`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolViolation {
    /// RSV1, RSV2 or RSV3 is set: an extension (such as `permessage-deflate`) is in use, or the
    /// bytes are not WebSocket frames.
    ReservedBits,
    /// An opcode RFC 6455 leaves reserved (3–7, 11–15).
    UnknownOpcode(u8),
    /// A close, ping or pong frame without FIN.
    FragmentedControl,
    /// A close, ping or pong frame longer than 125 bytes.
    ControlTooLong,
    /// A 64-bit length with its most significant bit set.
    LengthTooLarge,
    /// A continuation frame with no fragmented message open.
    UnexpectedContinuation,
    /// A new text or binary frame while a fragmented message is still open.
    UnfinishedMessage,
}

/// A WebSocket opcode, for [`encode_frame`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Opcode {
    /// A later fragment of a message.
    Continuation = OP_CONTINUATION,
    /// The first frame of a text message.
    Text = OP_TEXT,
    /// The first frame of a binary message.
    Binary = OP_BINARY,
    /// A close frame.
    Close = OP_CLOSE,
    /// A ping.
    Ping = OP_PING,
    /// A pong.
    Pong = OP_PONG,
}

/// Encodes one frame: `fin` and `opcode`, the shortest length form, and — when `mask` is given
/// (frames a client sends) — the mask key and the masked payload. It encodes what it is asked
/// to: a control frame over 125 bytes, or a fragmented one, comes out as such (which a reader
/// rejects).
pub fn encode_frame(opcode: Opcode, fin: bool, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAX_HEADER + payload.len());
    out.push((u8::from(fin) << 7) | opcode as u8);
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let len = payload.len();
    if len <= MAX_CONTROL_PAYLOAD {
        // Fits the 7-bit form.
        out.push(mask_bit | len as u8);
    } else if let Ok(short) = u16::try_from(len) {
        out.push(mask_bit | 126);
        out.extend_from_slice(&short.to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            let start = out.len();
            out.extend_from_slice(payload);
            apply_mask(&mut out[start..], key, 0);
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// A text frame carrying `payload` (see [`encode_frame`]).
pub fn text_frame(payload: &[u8], fin: bool, mask: Option<[u8; 4]>) -> Vec<u8> {
    encode_frame(Opcode::Text, fin, payload, mask)
}

/// A close frame with status `code` and `reason`, cut at a character boundary to the 123 bytes
/// that fit; masked with `mask` when given (a frame the gateway sends to the server in the
/// client's place). Use a code that may be sent (1000–1003, 1007–1011, 3000–4999): the code is
/// written as given.
pub fn close_frame(code: u16, reason: &str, mask: Option<[u8; 4]>) -> Bytes {
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    payload[2..2 + end].copy_from_slice(&reason.as_bytes()[..end]);
    Bytes::from(encode_frame(Opcode::Close, true, &payload[..2 + end], mask))
}

/// XORs `bytes` with `key`, the first byte being at offset `pos` (mod 4) of the payload.
fn apply_mask(bytes: &mut [u8], key: [u8; 4], pos: usize) {
    for (i, b) in bytes.iter_mut().enumerate() {
        *b ^= key[(pos + i) & 3];
    }
}

/// Reads the frames of one direction of a WebSocket connection and reports the Realtime events
/// the gateway acts on (see the [module docs](self)).
///
/// Feed it every byte of the direction, in order, after the upgrade response; use one scanner
/// per direction. Events are handed to a callback as they are found, so the common case (a
/// chunk of audio with no event) allocates nothing.
pub struct RealtimeScanner {
    max_message: usize,
    state: State,
    /// The header being read (`header_len` bytes so far).
    header: [u8; MAX_HEADER],
    header_len: usize,
    /// The frame whose payload is being read.
    frame: Frame,
    /// The current control frame's payload, unmasked.
    control: [u8; MAX_CONTROL_PAYLOAD],
    control_len: usize,
    /// A data message has started and its final frame has not ended.
    in_message: bool,
    /// What is done with the open data message's bytes.
    stage: Stage,
    /// The open text message's first bytes, unmasked.
    prefix: [u8; TYPE_PREFIX_BYTES],
    prefix_len: usize,
    /// The open text message, unmasked, when it is kept whole.
    message: Vec<u8>,
    /// While a chunk is read: the offset in it just past the bytes read so far.
    at: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a frame header.
    Header,
    /// Reading a frame's payload (`frame.remaining > 0`).
    Payload,
    /// A protocol error was reported: nothing more is read.
    Stopped,
}

#[derive(Debug, Clone, Copy)]
struct Frame {
    opcode: u8,
    fin: bool,
    mask: Option<[u8; 4]>,
    /// Payload bytes read so far, mod 4 (where the mask key stands).
    mask_pos: usize,
    /// Payload bytes still to come.
    remaining: u64,
}

/// What is done with a data message's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Reading the first bytes for the `type`.
    Prefix,
    /// Nothing more to read (a binary message, a type of no interest, or too long).
    Skip,
    /// A `response.created`: reported when the message ends; nothing kept.
    Created,
    /// Kept whole for parsing; its type is known.
    Keep(Kind),
    /// Kept whole for parsing; its type was not found in the prefix.
    Fallback,
}

/// A Realtime event type the scanner reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    ResponseCreated,
    ResponseDone,
    Error,
}

impl Kind {
    fn of(event_type: &[u8]) -> Option<Kind> {
        match event_type {
            b"response.created" => Some(Kind::ResponseCreated),
            b"response.done" => Some(Kind::ResponseDone),
            b"error" => Some(Kind::Error),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::ResponseCreated => "response.created",
            Kind::ResponseDone => "response.done",
            Kind::Error => "error",
        }
    }
}

impl fmt::Debug for RealtimeScanner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RealtimeScanner")
            .field("max_message", &self.max_message)
            .field("state", &self.state)
            .field("in_message", &self.in_message)
            .field("stage", &self.stage)
            .field("prefix_bytes", &self.prefix_len)
            .field("message_bytes", &self.message.len())
            .finish_non_exhaustive()
    }
}

impl RealtimeScanner {
    /// A scanner at the start of a connection's direction, keeping messages of up to
    /// `max_message` bytes when it has to (`response.done` events with long transcripts can be
    /// tens of kilobytes; 1 MiB is a generous bound).
    pub fn new(max_message: usize) -> Self {
        RealtimeScanner {
            max_message,
            state: State::Header,
            header: [0; MAX_HEADER],
            header_len: 0,
            frame: Frame {
                opcode: 0,
                fin: false,
                mask: None,
                mask_pos: 0,
                remaining: 0,
            },
            control: [0; MAX_CONTROL_PAYLOAD],
            control_len: 0,
            in_message: false,
            stage: Stage::Skip,
            prefix: [0; TYPE_PREFIX_BYTES],
            prefix_len: 0,
            message: Vec::new(),
            at: 0,
        }
    }

    /// Reads the next chunk of the direction's bytes, calling `on_event` for each event found
    /// in it, in order. Any chunking of the same bytes gives the same events. After a
    /// [`RealtimeEvent::ProtocolError`] every chunk is ignored.
    pub fn feed(&mut self, chunk: &[u8], mut on_event: impl FnMut(RealtimeEvent)) {
        let mut rest = chunk;
        while !rest.is_empty() {
            self.at = chunk.len() - rest.len();
            rest = match self.state {
                State::Stopped => return,
                State::Header => self.header_bytes(rest, &mut on_event),
                State::Payload => self.payload_bytes(rest, &mut on_event),
            };
        }
    }

    /// The scanner met a protocol error and reads no more.
    pub fn is_stopped(&self) -> bool {
        self.state == State::Stopped
    }

    /// Takes header bytes from `rest`; returns what follows them.
    fn header_bytes<'c>(
        &mut self,
        rest: &'c [u8],
        on_event: &mut impl FnMut(RealtimeEvent),
    ) -> &'c [u8] {
        let need = if self.header_len < 2 {
            2
        } else {
            header_size(self.header[1])
        };
        let take = (need - self.header_len).min(rest.len());
        self.header[self.header_len..self.header_len + take].copy_from_slice(&rest[..take]);
        self.header_len += take;
        self.at += take;
        let rest = &rest[take..];
        if self.header_len < need {
            return rest;
        }
        if need == 2 {
            if let Err(violation) = self.check_first_bytes() {
                self.stop(violation, on_event);
                return rest;
            }
            if header_size(self.header[1]) > 2 {
                return rest;
            }
        }
        self.start_frame(on_event);
        rest
    }

    /// Checks a header's first two bytes against the framing rules and the open message.
    fn check_first_bytes(&self) -> Result<(), ProtocolViolation> {
        let (b0, b1) = (self.header[0], self.header[1]);
        if b0 & 0x70 != 0 {
            return Err(ProtocolViolation::ReservedBits);
        }
        match b0 & 0x0F {
            OP_CONTINUATION if !self.in_message => Err(ProtocolViolation::UnexpectedContinuation),
            OP_TEXT | OP_BINARY if self.in_message => Err(ProtocolViolation::UnfinishedMessage),
            OP_CONTINUATION | OP_TEXT | OP_BINARY => Ok(()),
            OP_CLOSE | OP_PING | OP_PONG => {
                if b0 & 0x80 == 0 {
                    Err(ProtocolViolation::FragmentedControl)
                } else if usize::from(b1 & 0x7F) > MAX_CONTROL_PAYLOAD {
                    Err(ProtocolViolation::ControlTooLong)
                } else {
                    Ok(())
                }
            }
            op => Err(ProtocolViolation::UnknownOpcode(op)),
        }
    }

    /// The header is complete (and its first bytes checked): starts reading the payload.
    fn start_frame(&mut self, on_event: &mut impl FnMut(RealtimeEvent)) {
        let h = self.header;
        let (remaining, key_at) = match h[1] & 0x7F {
            126 => (u64::from(u16::from_be_bytes([h[2], h[3]])), 4),
            127 => (
                u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
                10,
            ),
            short => (u64::from(short), 2),
        };
        if remaining >> 63 != 0 {
            self.stop(ProtocolViolation::LengthTooLarge, on_event);
            return;
        }
        let mask =
            (h[1] & 0x80 != 0).then(|| [h[key_at], h[key_at + 1], h[key_at + 2], h[key_at + 3]]);
        let opcode = h[0] & 0x0F;
        self.frame = Frame {
            opcode,
            fin: h[0] & 0x80 != 0,
            mask,
            mask_pos: 0,
            remaining,
        };
        self.header_len = 0;
        self.state = State::Payload;
        match opcode {
            OP_TEXT => {
                self.in_message = true;
                self.stage = Stage::Prefix;
                self.prefix_len = 0;
            }
            OP_BINARY => {
                self.in_message = true;
                self.stage = Stage::Skip;
            }
            OP_CONTINUATION => {}
            _ => self.control_len = 0,
        }
        if remaining == 0 {
            self.end_frame(on_event);
        }
    }

    /// Takes payload bytes of the current frame from `rest` (non-empty); returns what follows.
    fn payload_bytes<'c>(
        &mut self,
        rest: &'c [u8],
        on_event: &mut impl FnMut(RealtimeEvent),
    ) -> &'c [u8] {
        let n = usize::try_from(self.frame.remaining).map_or(rest.len(), |r| r.min(rest.len()));
        let (now, later) = rest.split_at(n);
        self.at += n;
        if self.frame.opcode >= OP_CLOSE {
            // At most 125 bytes in all (checked with the header).
            let to = &mut self.control[self.control_len..self.control_len + n];
            to.copy_from_slice(now);
            if let Some(key) = self.frame.mask {
                apply_mask(to, key, self.frame.mask_pos);
            }
            self.control_len += n;
        } else {
            self.data_bytes(now, on_event);
        }
        self.frame.mask_pos = (self.frame.mask_pos + (n & 3)) & 3;
        self.frame.remaining -= n as u64;
        if self.frame.remaining == 0 {
            self.end_frame(on_event);
        }
        later
    }

    /// Payload bytes of a data frame (still masked, if the frame is).
    fn data_bytes(&mut self, mut bytes: &[u8], on_event: &mut impl FnMut(RealtimeEvent)) {
        let mut pos = self.frame.mask_pos;
        if self.stage == Stage::Prefix {
            let n = (TYPE_PREFIX_BYTES - self.prefix_len).min(bytes.len());
            let to = &mut self.prefix[self.prefix_len..self.prefix_len + n];
            to.copy_from_slice(&bytes[..n]);
            if let Some(key) = self.frame.mask {
                apply_mask(to, key, pos);
            }
            self.prefix_len += n;
            pos += n;
            bytes = &bytes[n..];
            self.classify(on_event);
        }
        if matches!(self.stage, Stage::Keep(_) | Stage::Fallback)
            && !bytes.is_empty()
            && self.room_for(bytes.len(), on_event)
        {
            let start = self.message.len();
            self.message.extend_from_slice(bytes);
            if let Some(key) = self.frame.mask {
                apply_mask(&mut self.message[start..], key, pos);
            }
        }
    }

    /// Decides, from the prefix read so far, what to do with the open text message.
    fn classify(&mut self, on_event: &mut impl FnMut(RealtimeEvent)) {
        self.stage = match prefix_type(&self.prefix[..self.prefix_len]) {
            PrefixScan::Type(t) => match Kind::of(t) {
                Some(Kind::ResponseCreated) => Stage::Created,
                Some(kind) => Stage::Keep(kind),
                None => Stage::Skip,
            },
            PrefixScan::NoType => Stage::Skip,
            PrefixScan::Incomplete if self.prefix_len < TYPE_PREFIX_BYTES => return,
            PrefixScan::Incomplete | PrefixScan::Unsure => Stage::Fallback,
        };
        if matches!(self.stage, Stage::Keep(_) | Stage::Fallback) {
            self.message.clear();
            if self.room_for(self.prefix_len, on_event) {
                self.message
                    .extend_from_slice(&self.prefix[..self.prefix_len]);
            }
        }
    }

    /// Whether `n` more bytes fit the kept message; if not, reports it oversized and skips the
    /// rest of it.
    fn room_for(&mut self, n: usize, on_event: &mut impl FnMut(RealtimeEvent)) -> bool {
        if self.message.len().saturating_add(n) <= self.max_message {
            return true;
        }
        let event_type = match self.stage {
            Stage::Keep(kind) => Some(kind.name()),
            _ => None,
        };
        on_event(RealtimeEvent::Oversized { event_type });
        self.stage = Stage::Skip;
        self.message = Vec::new();
        false
    }

    /// The current frame's payload is complete.
    fn end_frame(&mut self, on_event: &mut impl FnMut(RealtimeEvent)) {
        self.state = State::Header;
        match self.frame.opcode {
            OP_CLOSE => {
                let code = (self.control_len >= 2)
                    .then(|| u16::from_be_bytes([self.control[0], self.control[1]]));
                on_event(RealtimeEvent::Close { code });
            }
            OP_CONTINUATION | OP_TEXT | OP_BINARY if self.frame.fin => self.end_message(on_event),
            _ => {}
        }
    }

    /// The open data message's final frame has ended: reports it.
    fn end_message(&mut self, on_event: &mut impl FnMut(RealtimeEvent)) {
        self.in_message = false;
        match std::mem::replace(&mut self.stage, Stage::Skip) {
            Stage::Skip => {}
            Stage::Created => on_event(RealtimeEvent::ResponseCreated { end: self.at }),
            // The whole message is in the prefix, and its type was not found there.
            Stage::Prefix => {
                if self.prefix_len > self.max_message {
                    on_event(RealtimeEvent::Oversized { event_type: None });
                } else {
                    report(None, &self.prefix[..self.prefix_len], self.at, on_event);
                }
            }
            Stage::Keep(kind) => report(Some(kind), &self.message, self.at, on_event),
            Stage::Fallback => report(None, &self.message, self.at, on_event),
        }
        self.message.clear();
        if self.message.capacity() > KEEP_CAPACITY {
            self.message = Vec::new();
        }
    }

    fn stop(&mut self, violation: ProtocolViolation, on_event: &mut impl FnMut(RealtimeEvent)) {
        self.state = State::Stopped;
        self.message = Vec::new();
        on_event(RealtimeEvent::ProtocolError(violation));
    }
}

/// The header's full size, from its second byte.
fn header_size(b1: u8) -> usize {
    let length = match b1 & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let key = if b1 & 0x80 != 0 { 4 } else { 0 };
    2 + length + key
}

// ---------------------------------------------------------------------------------------------
// Reading a kept message
// ---------------------------------------------------------------------------------------------

/// A Realtime server event, reduced to what is reported.
#[derive(Deserialize)]
struct RawEvent<'a> {
    #[serde(default, rename = "type", borrow)]
    kind: Text<'a>,
    #[serde(default, borrow)]
    response: Option<RawResponse<'a>>,
    #[serde(default, borrow)]
    error: Detail<'a>,
}

#[derive(Deserialize)]
struct RawResponse<'a> {
    #[serde(default, borrow)]
    status: Text<'a>,
    #[serde(default)]
    usage: Option<RawUsage>,
}

#[derive(Deserialize)]
struct RawUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    total_tokens: Option<u64>,
    #[serde(default)]
    input_token_details: Option<RawInputDetails>,
    #[serde(default)]
    output_token_details: Option<RawOutputDetails>,
}

#[derive(Deserialize)]
struct RawInputDetails {
    #[serde(default)]
    text_tokens: Option<u64>,
    #[serde(default)]
    audio_tokens: Option<u64>,
    #[serde(default)]
    cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct RawOutputDetails {
    #[serde(default)]
    text_tokens: Option<u64>,
    #[serde(default)]
    audio_tokens: Option<u64>,
}

impl RawUsage {
    fn usage(&self) -> Option<(Usage, Option<RealtimeTokenDetails>)> {
        if self.input_tokens.is_none()
            && self.output_tokens.is_none()
            && self.total_tokens.is_none()
        {
            return None;
        }
        let prompt_tokens = self.input_tokens.unwrap_or(0);
        let completion_tokens = self.output_tokens.unwrap_or(0);
        let usage = Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: self
                .total_tokens
                .unwrap_or(prompt_tokens.saturating_add(completion_tokens)),
        };
        let details = (self.input_token_details.is_some() || self.output_token_details.is_some())
            .then(|| {
                let input = self.input_token_details.as_ref();
                let output = self.output_token_details.as_ref();
                RealtimeTokenDetails {
                    input_text_tokens: input.and_then(|d| d.text_tokens).unwrap_or(0),
                    input_audio_tokens: input.and_then(|d| d.audio_tokens).unwrap_or(0),
                    input_cached_tokens: input.and_then(|d| d.cached_tokens).unwrap_or(0),
                    output_text_tokens: output.and_then(|d| d.text_tokens).unwrap_or(0),
                    output_audio_tokens: output.and_then(|d| d.audio_tokens).unwrap_or(0),
                }
            });
        Some((usage, details))
    }
}

/// Reports a complete kept message. `kind`: its type when the prefix told it (it is then
/// reported even when the message does not parse, with empty fields); else the type is taken
/// from the parse.
fn report(kind: Option<Kind>, json: &[u8], end: usize, on_event: &mut impl FnMut(RealtimeEvent)) {
    let parsed = serde_json::from_slice::<RawEvent<'_>>(json).ok();
    let kind = kind.or_else(|| {
        let event_type = parsed.as_ref()?.kind.as_str()?;
        Kind::of(event_type.as_bytes())
    });
    let Some(kind) = kind else {
        return;
    };
    let event = match kind {
        Kind::ResponseCreated => RealtimeEvent::ResponseCreated { end },
        Kind::ResponseDone => {
            let response = parsed.and_then(|e| e.response);
            let status = response
                .as_ref()
                .and_then(|r| r.status.as_str())
                .map(short_code);
            let (usage, details) = response
                .as_ref()
                .and_then(|r| r.usage.as_ref())
                .and_then(RawUsage::usage)
                .map_or((None, None), |(u, d)| (Some(u), d));
            RealtimeEvent::ResponseDone {
                usage,
                details,
                status,
            }
        }
        Kind::Error => RealtimeEvent::Error {
            code: parsed.as_ref().and_then(|e| e.error.code()).map(short_code),
        },
    };
    on_event(event);
}

// ---------------------------------------------------------------------------------------------
// The `type` of a message from its first bytes
// ---------------------------------------------------------------------------------------------

/// What a message's first bytes tell about its `type`.
#[derive(Debug, PartialEq, Eq)]
enum PrefixScan<'a> {
    /// The top-level `type` member is this string (raw, without escapes).
    Type(&'a [u8]),
    /// There is no string `type` to find: not a JSON object, the object ended without one, its
    /// `type` is not a string, or the text is not JSON.
    NoType,
    /// The bytes end before the answer.
    Incomplete,
    /// A key before `type`, or the type itself, is written with escapes: only a full parse
    /// can tell.
    Unsure,
}

/// One step of skipping through JSON text.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// The value ends just before this index.
    Done(usize),
    Incomplete,
    Bad,
}

/// Reads the top-level `type` member from the start of a JSON object, skipping the members
/// before it.
fn prefix_type(p: &[u8]) -> PrefixScan<'_> {
    let mut i = skip_ws(p, 0);
    match p.get(i) {
        None => return PrefixScan::Incomplete,
        Some(b'{') => i += 1,
        Some(_) => return PrefixScan::NoType,
    }
    loop {
        i = skip_ws(p, i);
        match p.get(i) {
            None => return PrefixScan::Incomplete,
            Some(b'"') => {}
            // `}`: the object ended without a type; anything else is not JSON.
            Some(_) => return PrefixScan::NoType,
        }
        let key = match plain_string(p, i) {
            Ok((key, end)) => {
                i = end;
                key
            }
            Err(scan) => return scan,
        };
        i = skip_ws(p, i);
        match p.get(i) {
            None => return PrefixScan::Incomplete,
            Some(b':') => i = skip_ws(p, i + 1),
            Some(_) => return PrefixScan::NoType,
        }
        if key == b"type" {
            return match p.get(i) {
                None => PrefixScan::Incomplete,
                Some(b'"') => match plain_string(p, i) {
                    Ok((value, _)) => PrefixScan::Type(value),
                    Err(scan) => scan,
                },
                Some(_) => PrefixScan::NoType,
            };
        }
        i = match skip_value(p, i) {
            Step::Done(end) => skip_ws(p, end),
            Step::Incomplete => return PrefixScan::Incomplete,
            Step::Bad => return PrefixScan::NoType,
        };
        match p.get(i) {
            None => return PrefixScan::Incomplete,
            Some(b',') => i += 1,
            Some(_) => return PrefixScan::NoType,
        }
    }
}

/// The string starting with the quote at `p[at]`, when it has no escapes, and the index after
/// its closing quote.
fn plain_string(p: &[u8], at: usize) -> Result<(&[u8], usize), PrefixScan<'_>> {
    let start = at + 1;
    let body = p.get(start..).unwrap_or_default();
    match memchr2(b'"', b'\\', body) {
        None => Err(PrefixScan::Incomplete),
        Some(end) if body[end] == b'"' => Ok((&body[..end], start + end + 1)),
        Some(_) => Err(PrefixScan::Unsure),
    }
}

fn skip_ws(p: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\r' | b'\n') = p.get(i) {
        i += 1;
    }
    i
}

/// Skips the JSON value starting at `p[at]` (not whitespace).
fn skip_value(p: &[u8], at: usize) -> Step {
    match p.get(at) {
        None => Step::Incomplete,
        Some(b'"') => skip_string(p, at),
        Some(b'{' | b'[') => {
            let mut depth = 0usize;
            let mut i = at;
            while let Some(&b) = p.get(i) {
                match b {
                    b'"' => match skip_string(p, i) {
                        Step::Done(end) => {
                            i = end;
                            continue;
                        }
                        other => return other,
                    },
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Step::Done(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            Step::Incomplete
        }
        Some(_) => {
            // A number, `true`, `false` or `null`: runs of these characters.
            let len = p[at..]
                .iter()
                .position(|&b| !(b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')));
            match len {
                None => Step::Incomplete,
                Some(0) => Step::Bad,
                Some(len) => Step::Done(at + len),
            }
        }
    }
}

/// Skips the string starting with the quote at `p[at]`, escapes and all.
fn skip_string(p: &[u8], at: usize) -> Step {
    let mut i = at + 1;
    loop {
        let Some(rest) = p.get(i..) else {
            return Step::Incomplete;
        };
        match memchr2(b'"', b'\\', rest) {
            None => return Step::Incomplete,
            Some(off) if rest[off] == b'"' => return Step::Done(i + off + 1),
            Some(off) => i += off + 2,
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    const MAX: usize = 1024 * 1024;
    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    const RESPONSE_DONE: &str = r#"{"type":"response.done","event_id":"event_AeqLA8iR6FK20L4XZs2P6","response":{"object":"realtime.response","id":"resp_AeqL8XwMUOri9OhcQJIu9","status":"completed","status_details":null,"output":[{"id":"item_AeqL8gmRWDn9bIsUM2T35","object":"realtime.item","type":"message","status":"completed","role":"assistant","content":[{"type":"audio","transcript":"Hello! How can I assist you today?"}]}],"usage":{"total_tokens":305,"input_tokens":173,"output_tokens":132,"input_token_details":{"text_tokens":121,"audio_tokens":52,"cached_tokens":64,"cached_tokens_details":{"text_tokens":64,"audio_tokens":0}},"output_token_details":{"text_tokens":36,"audio_tokens":96}},"metadata":null}}"#;
    const RESPONSE_CREATED: &str = r#"{"type":"response.created","event_id":"event_1","response":{"object":"realtime.response","id":"resp_1","status":"in_progress","status_details":null,"output":[],"usage":null}}"#;
    const ERROR: &str = r#"{"type":"error","event_id":"event_3","error":{"type":"invalid_request_error","code":"invalid_value","message":"Invalid value: 'x'. secret","param":"session.voice","event_id":null}}"#;
    const SESSION_CREATED: &str = r#"{"type":"session.created","event_id":"event_0","session":{"id":"sess_1","object":"realtime.session","model":"gpt-4o-realtime-preview","modalities":["audio","text"],"voice":"alloy"}}"#;

    fn done_event() -> RealtimeEvent {
        RealtimeEvent::ResponseDone {
            usage: Some(Usage {
                prompt_tokens: 173,
                completion_tokens: 132,
                total_tokens: 305,
            }),
            details: Some(RealtimeTokenDetails {
                input_text_tokens: 121,
                input_audio_tokens: 52,
                input_cached_tokens: 64,
                output_text_tokens: 36,
                output_audio_tokens: 96,
            }),
            status: Some("completed".into()),
        }
    }

    fn error_event(code: Option<&str>) -> RealtimeEvent {
        RealtimeEvent::Error {
            code: code.map(String::from),
        }
    }

    fn close_event(code: Option<u16>) -> RealtimeEvent {
        RealtimeEvent::Close { code }
    }

    fn audio_delta(base64_len: usize) -> String {
        format!(
            r#"{{"type":"response.audio.delta","event_id":"event_2","response_id":"resp_1","item_id":"item_1","output_index":0,"content_index":0,"delta":"{}"}}"#,
            "QUJD".repeat(base64_len / 4)
        )
    }

    /// The events of `chunks` fed in order to a new scanner, with each `ResponseCreated`'s
    /// `end` made an offset in the whole stream.
    fn scan_chunks(max: usize, chunks: &[&[u8]]) -> Vec<RealtimeEvent> {
        let mut s = RealtimeScanner::new(max);
        let mut out = Vec::new();
        let mut base = 0;
        for c in chunks {
            s.feed(c, |e| {
                out.push(match e {
                    RealtimeEvent::ResponseCreated { end } => {
                        assert!((1..=c.len()).contains(&end), "{end} in {}", c.len());
                        created(base + end)
                    }
                    e => e,
                })
            });
            base += c.len();
        }
        out
    }

    fn created(end: usize) -> RealtimeEvent {
        RealtimeEvent::ResponseCreated { end }
    }

    fn scan(max: usize, stream: &[u8]) -> Vec<RealtimeEvent> {
        scan_chunks(max, &[stream])
    }

    /// The events of `stream`, checked to be the same whatever the chunking: whole, a byte at a
    /// time, split in two at every offset, and in random chunks.
    fn scan_all_ways(max: usize, stream: &[u8]) -> Vec<RealtimeEvent> {
        let whole = scan(max, stream);
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(scan_chunks(max, &bytes), whole, "a byte at a time");
        for at in 0..=stream.len() {
            let (a, b) = stream.split_at(at);
            assert_eq!(scan_chunks(max, &[a, b]), whole, "split at {at}");
        }
        let mut rng = StdRng::seed_from_u64(stream.len() as u64);
        for round in 0..50 {
            let mut chunks = Vec::new();
            let mut rest = stream;
            while !rest.is_empty() {
                let cap = if round % 2 == 0 { 16 } else { 600 };
                let n = rng.random_range(0..=cap).min(rest.len());
                let (a, b) = rest.split_at(n);
                chunks.push(a);
                rest = b;
            }
            assert_eq!(scan_chunks(max, &chunks), whole, "round {round}");
        }
        whole
    }

    fn frame(op: Opcode, fin: bool, payload: &[u8], mask: bool) -> Vec<u8> {
        encode_frame(op, fin, payload, mask.then_some(KEY))
    }

    /// A conversation in one direction: every kind of frame, a fragmented message with control
    /// frames between its fragments (the `type` split across fragments).
    fn conversation(mask: bool) -> Vec<u8> {
        let mut s = Vec::new();
        s.extend(frame(Opcode::Text, true, SESSION_CREATED.as_bytes(), mask));
        s.extend(frame(Opcode::Text, true, RESPONSE_CREATED.as_bytes(), mask));
        s.extend(frame(
            Opcode::Text,
            true,
            audio_delta(3000).as_bytes(),
            mask,
        ));
        s.extend(frame(Opcode::Ping, true, b"keepalive", mask));
        let done = RESPONSE_DONE.as_bytes();
        s.extend(frame(Opcode::Text, false, &done[..5], mask));
        s.extend(frame(Opcode::Pong, true, b"", mask));
        s.extend(frame(Opcode::Continuation, false, &done[5..300], mask));
        s.extend(frame(Opcode::Ping, true, b"p", mask));
        s.extend(frame(Opcode::Continuation, false, &done[300..301], mask));
        s.extend(frame(Opcode::Continuation, true, &done[301..], mask));
        s.extend(frame(Opcode::Binary, false, ERROR.as_bytes(), mask));
        s.extend(frame(Opcode::Continuation, true, b"\x00\x01", mask));
        s.extend(frame(Opcode::Text, true, ERROR.as_bytes(), mask));
        s.extend(frame(Opcode::Text, true, audio_delta(100).as_bytes(), mask));
        s.extend(close_frame(1000, "bye", mask.then_some(KEY)));
        s
    }

    fn conversation_events(mask: bool) -> Vec<RealtimeEvent> {
        // The second frame is the `response.created`.
        let end = frame(Opcode::Text, true, SESSION_CREATED.as_bytes(), mask).len()
            + frame(Opcode::Text, true, RESPONSE_CREATED.as_bytes(), mask).len();
        vec![
            created(end),
            done_event(),
            error_event(Some("invalid_value")),
            close_event(Some(1000)),
        ]
    }

    #[test]
    fn conversation_at_every_split() {
        assert_eq!(
            scan_all_ways(MAX, &conversation(false)),
            conversation_events(false)
        );
    }

    #[test]
    fn masked_conversation_at_every_split() {
        let stream = conversation(true);
        assert_ne!(stream, conversation(false));
        assert_eq!(scan_all_ways(MAX, &stream), conversation_events(true));
        // Masking frame by frame: a mix of masked and unmasked frames reads the same too.
        let mut mixed = frame(Opcode::Text, false, &RESPONSE_DONE.as_bytes()[..40], true);
        mixed.extend(frame(Opcode::Ping, true, b"x", false));
        mixed.extend(frame(
            Opcode::Continuation,
            true,
            &RESPONSE_DONE.as_bytes()[40..],
            false,
        ));
        assert_eq!(scan_all_ways(MAX, &mixed), vec![done_event()]);
    }

    #[test]
    fn masks_follow_the_payload_offset() {
        // Fragment and chunk boundaries at every offset mod 4, masked: the key position is kept
        // per frame, across chunks.
        for cut in 1..8 {
            let done = RESPONSE_DONE.as_bytes();
            let mut s = frame(Opcode::Text, false, &done[..cut], true);
            s.extend(frame(Opcode::Continuation, true, &done[cut..], true));
            assert_eq!(scan_all_ways(MAX, &s), vec![done_event()], "cut {cut}");
        }
    }

    /// A `response.done` of exactly `len` bytes (trailing spaces as padding).
    fn done_of_len(len: usize) -> Vec<u8> {
        let json = r#"{"type":"response.done","response":{"status":"completed","usage":{"input_tokens":3,"output_tokens":4}}}"#;
        let mut v = json.as_bytes().to_vec();
        assert!(len >= v.len());
        v.resize(len, b' ');
        v
    }

    fn small_done() -> RealtimeEvent {
        RealtimeEvent::ResponseDone {
            usage: Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 4,
                total_tokens: 7,
            }),
            details: None,
            status: Some("completed".into()),
        }
    }

    #[test]
    fn every_length_form() {
        // (payload length, header length when unmasked)
        for (len, header) in [
            (125, 2),
            (126, 4),
            (127, 4),
            (65535, 4),
            (65536, 10),
            (70000, 10),
        ] {
            let payload = done_of_len(len);
            for mask in [false, true] {
                let f = frame(Opcode::Text, true, &payload, mask);
                assert_eq!(f.len(), header + len + if mask { 4 } else { 0 }, "{len}");
                assert_eq!(scan(MAX, &f), vec![small_done()], "{len} {mask}");
                let bytes: Vec<&[u8]> = f.chunks(7).collect();
                assert_eq!(scan_chunks(MAX, &bytes), vec![small_done()], "{len} {mask}");
            }
        }
        // Lengths need not use their shortest form.
        let payload = done_of_len(110);
        let mut f16 = vec![0x81, 126, 0, 110];
        f16.extend_from_slice(&payload);
        let mut f64 = vec![0x81, 127, 0, 0, 0, 0, 0, 0, 0, 110];
        f64.extend_from_slice(&payload);
        let mut f64_masked = vec![0x81, 0xFF, 0, 0, 0, 0, 0, 0, 0, 110];
        f64_masked.extend_from_slice(&KEY);
        let start = f64_masked.len();
        f64_masked.extend_from_slice(&payload);
        apply_mask(&mut f64_masked[start..], KEY, 0);
        for f in [f16, f64, f64_masked] {
            assert_eq!(scan_all_ways(MAX, &f), vec![small_done()]);
        }
    }

    /// `end` is where the final frame ends, in the chunk that completed the message: before
    /// any control frame after it, and after an empty final fragment's header.
    #[test]
    fn response_created_end() {
        let json = RESPONSE_CREATED.as_bytes();
        let mut s = frame(Opcode::Text, false, &json[..3], true);
        s.extend(frame(Opcode::Ping, true, b"x", false));
        s.extend(frame(Opcode::Continuation, true, &json[3..], false));
        let end = s.len();
        s.extend(frame(Opcode::Ping, true, b"after", false));
        s.extend(frame(Opcode::Text, true, json, true));
        let second = s.len();
        s.extend(frame(Opcode::Text, false, json, false));
        s.extend(frame(Opcode::Continuation, true, b"", false));
        let third = s.len();
        s.extend(close_frame(1000, "", None));
        assert_eq!(
            scan_all_ways(MAX, &s),
            vec![
                created(end),
                created(second),
                created(third),
                close_event(Some(1000))
            ]
        );
        // In the chunk's own offsets.
        let mut sc = RealtimeScanner::new(MAX);
        let mut got = Vec::new();
        sc.feed(&s[..end - 10], |e| got.push(e));
        sc.feed(&s[end - 10..], |e| got.push(e));
        assert_eq!(got[0], created(10));
        assert_eq!(got[1], created(second - end + 10));
    }

    #[test]
    fn empty_frames_and_messages() {
        let mut s = frame(Opcode::Text, true, b"", false);
        s.extend(frame(Opcode::Text, true, b"", true));
        s.extend(frame(Opcode::Binary, true, b"", false));
        s.extend(frame(Opcode::Ping, true, b"", true));
        // A message ended by an empty continuation, after an empty first frame.
        s.extend(frame(Opcode::Text, false, b"", false));
        s.extend(frame(Opcode::Continuation, false, ERROR.as_bytes(), false));
        s.extend(frame(Opcode::Continuation, true, b"", false));
        assert_eq!(
            scan_all_ways(MAX, &s),
            vec![error_event(Some("invalid_value"))]
        );
    }

    #[test]
    fn response_done_variants() {
        let done = |json: &str| scan_all_ways(MAX, &text_frame(json.as_bytes(), true, None));
        let event = |usage: Option<(u64, u64, u64)>, status: Option<&str>| {
            vec![RealtimeEvent::ResponseDone {
                usage: usage.map(|(p, c, t)| Usage {
                    prompt_tokens: p,
                    completion_tokens: c,
                    total_tokens: t,
                }),
                details: None,
                status: status.map(String::from),
            }]
        };
        assert_eq!(
            done(r#"{"type":"response.done","response":{"status":"cancelled","usage":null}}"#),
            event(None, Some("cancelled"))
        );
        assert_eq!(
            done(r#"{"type":"response.done","response":{"status":"failed"}}"#),
            event(None, Some("failed"))
        );
        assert_eq!(
            done(r#"{"type":"response.done","response":{"usage":{}}}"#),
            event(None, None)
        );
        assert_eq!(done(r#"{"type":"response.done"}"#), event(None, None));
        assert_eq!(
            done(r#"{"type":"response.done","response":null}"#),
            event(None, None)
        );
        // The total is the sum when not reported; a lone count is enough.
        assert_eq!(
            done(
                r#"{"type":"response.done","response":{"usage":{"input_tokens":10,"output_tokens":5}}}"#
            ),
            event(Some((10, 5, 15)), None)
        );
        assert_eq!(
            done(r#"{"type":"response.done","response":{"usage":{"output_tokens":5}}}"#),
            event(Some((0, 5, 5)), None)
        );
        assert_eq!(
            done(r#"{"type":"response.done","response":{"usage":{"input_tokens":2}}}"#),
            event(Some((2, 0, 2)), None)
        );
        assert_eq!(
            done(r#"{"type":"response.done","response":{"usage":{"total_tokens":9}}}"#),
            event(Some((0, 0, 9)), None)
        );
        assert_eq!(
            done(
                r#"{"type":"response.done","response":{"usage":{"input_tokens":18446744073709551615,"output_tokens":1}}}"#
            ),
            event(Some((u64::MAX, 1, u64::MAX)), None)
        );
        // Details: either object is enough; missing counts are 0.
        let got = done(
            r#"{"type":"response.done","response":{"usage":{"input_tokens":1,"output_token_details":{"audio_tokens":8}}}}"#,
        );
        let RealtimeEvent::ResponseDone { details, .. } = &got[0] else {
            panic!("{got:?}")
        };
        assert_eq!(
            *details,
            Some(RealtimeTokenDetails {
                output_audio_tokens: 8,
                ..Default::default()
            })
        );
        let got = done(
            r#"{"type":"response.done","response":{"usage":{"input_tokens":1,"input_token_details":{"audio_tokens":8,"text_tokens":2,"cached_tokens":1}}}}"#,
        );
        let RealtimeEvent::ResponseDone { details, .. } = &got[0] else {
            panic!("{got:?}")
        };
        assert_eq!(
            *details,
            Some(RealtimeTokenDetails {
                input_audio_tokens: 8,
                input_text_tokens: 2,
                input_cached_tokens: 1,
                ..Default::default()
            })
        );
        // Details without any count: no usage, no details.
        let got = done(
            r#"{"type":"response.done","response":{"usage":{"input_token_details":{"audio_tokens":8}}}}"#,
        );
        assert_eq!(got, event(None, None));
        // Unreadable bodies still report the event, with nothing in it.
        assert_eq!(
            done(r#"{"type":"response.done","response":{"usage":{"input_tokens":-1}}}"#),
            event(None, None)
        );
        assert_eq!(
            done(r#"{"type":"response.done","response":"#),
            event(None, None)
        );
        // A long status is cut at 64 bytes.
        let long = "s".repeat(100);
        let json = format!(r#"{{"type":"response.done","response":{{"status":"{long}"}}}}"#);
        assert_eq!(done(&json), event(None, Some(&long[..64])));
        // A non-string status is none.
        assert_eq!(
            done(r#"{"type":"response.done","response":{"status":7}}"#),
            event(None, None)
        );
    }

    #[test]
    fn error_codes() {
        let err = |json: &str| scan(MAX, &text_frame(json.as_bytes(), true, None));
        assert_eq!(err(ERROR), vec![error_event(Some("invalid_value"))]);
        assert!(!format!("{:?}", err(ERROR)).contains("secret"));
        assert_eq!(
            err(r#"{"type":"error","error":{"code":429}}"#),
            vec![error_event(Some("429"))]
        );
        assert_eq!(
            err(r#"{"type":"error","error":{"code":null,"message":"m"}}"#),
            vec![error_event(None)]
        );
        assert_eq!(err(r#"{"type":"error"}"#), vec![error_event(None)]);
        assert_eq!(
            err(r#"{"type":"error","error":"flat"}"#),
            vec![error_event(None)]
        );
        let long = "c".repeat(80);
        assert_eq!(
            err(&format!(
                r#"{{"type":"error","error":{{"code":"{long}"}}}}"#
            )),
            vec![error_event(Some(&long[..64]))]
        );
        // Not JSON after its type: still an error event.
        assert_eq!(err(r#"{"type":"error", nonsense"#), vec![error_event(None)]);
    }

    #[test]
    fn uninteresting_and_odd_messages_report_nothing() {
        for json in [
            SESSION_CREATED.to_owned(),
            audio_delta(40),
            r#"{"type":"response.text.delta","delta":"error"}"#.to_owned(),
            r#"{"type":"response.done.extra"}"#.to_owned(),
            r#"{"type":"Error"}"#.to_owned(),
            r#"{"type":7,"response":{}}"#.to_owned(),
            r#"{"type":null}"#.to_owned(),
            r#"{"event_id":"x"}"#.to_owned(),
            r#"{}"#.to_owned(),
            r#"[{"type":"error"}]"#.to_owned(),
            r#""error""#.to_owned(),
            "not json".to_owned(),
            r#"{"type""#.to_owned(),
            r#"{"a":1 "type":"error"}"#.to_owned(),
            r#"{"a" 1,"type":"error"}"#.to_owned(),
            r#"{"a":,"type":"error"}"#.to_owned(),
            String::new(),
        ] {
            let f = text_frame(json.as_bytes(), true, None);
            assert_eq!(scan_all_ways(MAX, &f), vec![], "{json}");
        }
        // Binary messages are never read, whatever they hold.
        let f = encode_frame(Opcode::Binary, true, RESPONSE_DONE.as_bytes(), None);
        assert_eq!(scan(MAX, &f), vec![]);
    }

    #[test]
    fn type_need_not_come_first() {
        let cases = [
            format!(
                r#"{{"event_id":"event_x","type":"response.done",{}"#,
                &RESPONSE_DONE[24..]
            ),
            r#"  {
                "event_id" : "e",
                "meta": {"a": [1, 2, {"b": "}]\"{"}], "c": {}},
                "n": -1.5e3, "t": true, "f": false, "z": null, "s": "x\"y",
                "type" : "error", "error": {"code": "late"}
            }"#
            .to_owned(),
            r#"{"x":[],"type":"response.created"}"#.to_owned(),
        ];
        let expected = [
            vec![done_event()],
            vec![error_event(Some("late"))],
            vec![created(0)],
        ];
        for (json, want) in cases.iter().zip(expected) {
            for mask in [None, Some(KEY)] {
                let f = text_frame(json.as_bytes(), true, mask);
                let want: Vec<_> = want
                    .iter()
                    .map(|e| match e {
                        RealtimeEvent::ResponseCreated { .. } => created(f.len()),
                        e => e.clone(),
                    })
                    .collect();
                assert_eq!(scan_all_ways(MAX, &f), want, "{json}");
            }
        }
    }

    #[test]
    fn type_beyond_the_prefix_falls_back_to_a_full_parse() {
        let pad = "p".repeat(TYPE_PREFIX_BYTES);
        let late_done = format!(
            r#"{{"event_id":"{pad}","type":"response.done","response":{{"usage":{{"input_tokens":1,"output_tokens":1}}}}}}"#
        );
        let want = vec![RealtimeEvent::ResponseDone {
            usage: Some(Usage {
                prompt_tokens: 1,
                completion_tokens: 1,
                total_tokens: 2,
            }),
            details: None,
            status: None,
        }];
        let f = text_frame(late_done.as_bytes(), true, Some(KEY));
        assert_eq!(scan_all_ways(MAX, &f), want);
        let late_created = format!(r#"{{"event_id":"{pad}","type":"response.created"}}"#);
        let f = text_frame(late_created.as_bytes(), true, None);
        assert_eq!(scan(MAX, &f), vec![created(f.len())]);
        // Escapes in an earlier key or in the type itself: a full parse decides.
        let escaped_key = r#"{"a\"b":1,"type":"error"}"#;
        let f = text_frame(escaped_key.as_bytes(), true, None);
        assert_eq!(scan_all_ways(MAX, &f), vec![error_event(None)]);
        let escaped_type = r#"{"type":"response\u002edone"}"#;
        let f = text_frame(escaped_type.as_bytes(), true, None);
        assert_eq!(
            scan_all_ways(MAX, &f),
            vec![RealtimeEvent::ResponseDone {
                usage: None,
                details: None,
                status: None
            }]
        );
        // A late type of no interest: nothing, and the buffer is released after.
        let late_delta = format!(r#"{{"event_id":"{pad}","type":"response.audio.delta"}}"#);
        let mut s = RealtimeScanner::new(MAX);
        s.feed(&text_frame(late_delta.as_bytes(), true, None), |e| {
            panic!("{e:?}")
        });
        assert!(s.message.capacity() <= KEEP_CAPACITY);
        // Too long to keep: reported without a type.
        let f = text_frame(late_done.as_bytes(), true, None);
        assert_eq!(
            scan_all_ways(300, &f),
            vec![RealtimeEvent::Oversized { event_type: None }]
        );
        // A message that ends inside the prefix without telling its type is parsed whole,
        // unless it is over the bound.
        let unfinished = r#"{"type": "#;
        let f = text_frame(unfinished.as_bytes(), true, None);
        assert_eq!(scan(MAX, &f), vec![]);
        assert_eq!(
            scan(5, &f),
            vec![RealtimeEvent::Oversized { event_type: None }]
        );
        assert_eq!(scan(unfinished.len(), &f), vec![]);
    }

    #[test]
    fn audio_is_skipped_without_copying() {
        let delta = audio_delta(1024 * 1024);
        let f = frame(Opcode::Text, true, delta.as_bytes(), false);
        let append = format!(
            r#"{{"type":"input_audio_buffer.append","event_id":"e","audio":"{}"}}"#,
            "QUJD".repeat(256 * 1024)
        );
        let masked = frame(Opcode::Text, true, append.as_bytes(), true);
        for stream in [&f, &masked] {
            let mut s = RealtimeScanner::new(MAX);
            for chunk in stream.chunks(16 * 1024) {
                s.feed(chunk, |e| panic!("{e:?}"));
                assert_eq!(s.message.capacity(), 0);
                assert!(s.prefix_len <= TYPE_PREFIX_BYTES);
            }
            assert_eq!(s.stage, Stage::Skip);
            assert!(!s.in_message);
            // Still in step: the next message is read.
            let mut got = Vec::new();
            s.feed(&text_frame(ERROR.as_bytes(), true, None), |e| got.push(e));
            assert_eq!(got, vec![error_event(Some("invalid_value"))]);
        }
    }

    #[test]
    fn kept_buffers_are_bounded_and_released() {
        let transcript = "t".repeat(100 * 1024);
        let big = RESPONSE_DONE.replace("Hello! How can I assist you today?", &transcript);
        let mut s = RealtimeScanner::new(MAX);
        let mut got = Vec::new();
        s.feed(&text_frame(big.as_bytes(), true, None), |e| got.push(e));
        assert_eq!(got, vec![done_event()]);
        assert_eq!(s.message.capacity(), 0, "a large buffer is released");
        s.feed(&text_frame(RESPONSE_DONE.as_bytes(), true, None), |e| {
            got.push(e)
        });
        let kept = s.message.capacity();
        assert!(kept > 0 && kept <= KEEP_CAPACITY, "{kept}");
        // A medium-sized message (8 KiB) keeps its buffer for the next one too.
        let medium = RESPONSE_DONE.replace("Hello! How can I assist you today?", &"t".repeat(8000));
        s.feed(&text_frame(medium.as_bytes(), true, None), |e| got.push(e));
        let kept = s.message.capacity();
        assert!((8000..=KEEP_CAPACITY).contains(&kept), "{kept}");
        assert_eq!(got, vec![done_event(); 3]);
    }

    #[test]
    fn oversized_messages() {
        let max = RESPONSE_DONE.len() - 1;
        let mut s = frame(Opcode::Text, true, RESPONSE_DONE.as_bytes(), false);
        s.extend(frame(Opcode::Text, true, ERROR.as_bytes(), true));
        let big_error = format!(
            r#"{{"type":"error","error":{{"code":"x","message":"{}"}}}}"#,
            "m".repeat(max)
        );
        s.extend(frame(Opcode::Text, true, big_error.as_bytes(), false));
        s.extend(frame(
            Opcode::Text,
            true,
            RESPONSE_CREATED.as_bytes(),
            false,
        ));
        assert_eq!(
            scan_all_ways(max, &s),
            vec![
                RealtimeEvent::Oversized {
                    event_type: Some("response.done")
                },
                error_event(Some("invalid_value")),
                RealtimeEvent::Oversized {
                    event_type: Some("error")
                },
                created(s.len()),
            ]
        );
        // Exactly at the bound is kept.
        let f = frame(Opcode::Text, true, RESPONSE_DONE.as_bytes(), false);
        assert_eq!(scan(RESPONSE_DONE.len(), &f), vec![done_event()]);
        // A bound smaller than the prefix: the kept prefix alone is too long.
        assert_eq!(
            scan_all_ways(10, &f),
            vec![RealtimeEvent::Oversized {
                event_type: Some("response.done")
            }]
        );
        // response.created is never kept, so never too long.
        let f = frame(Opcode::Text, true, RESPONSE_CREATED.as_bytes(), false);
        assert_eq!(scan(1, &f), vec![created(f.len())]);
        // The oversized message's buffer is released at once.
        let mut sc = RealtimeScanner::new(1000);
        let huge = RESPONSE_DONE.replace("Hello!", &"h".repeat(5000));
        let f = frame(Opcode::Text, true, huge.as_bytes(), false);
        let mut got = Vec::new();
        sc.feed(&f[..3000], |e| got.push(e));
        assert_eq!(
            got,
            vec![RealtimeEvent::Oversized {
                event_type: Some("response.done")
            }]
        );
        assert_eq!(sc.message.capacity(), 0);
        sc.feed(&f[3000..], |e| got.push(e));
        assert_eq!(got.len(), 1);
    }

    #[test]
    fn close_frames() {
        let mut s = close_frame(1000, "done", None).to_vec();
        s.extend(vec![0x88, 0x00]);
        s.extend(frame(Opcode::Close, true, b"\x03", false));
        s.extend(close_frame(4001, "", Some(KEY)));
        s.extend(frame(Opcode::Close, true, &[0x03, 0xF3, b'x'], true));
        // Reading goes on after a close.
        s.extend(frame(
            Opcode::Text,
            true,
            RESPONSE_CREATED.as_bytes(),
            false,
        ));
        assert_eq!(
            scan_all_ways(MAX, &s),
            vec![
                close_event(Some(1000)),
                close_event(None),
                close_event(None),
                close_event(Some(4001)),
                close_event(Some(1011)),
                created(s.len()),
            ]
        );
    }

    #[test]
    fn close_frame_encoding() {
        let f = close_frame(1008, "policy", None);
        assert_eq!(&f[..], b"\x88\x08\x03\xf0policy");
        let f = close_frame(1000, "", None);
        assert_eq!(&f[..], b"\x88\x02\x03\xe8");
        // Masked: the key follows the length, the payload is masked with it.
        let f = close_frame(1000, "ab", Some([1, 2, 3, 4]));
        assert_eq!(
            &f[..],
            &[
                0x88,
                0x84,
                1,
                2,
                3,
                4,
                0x03 ^ 1,
                0xe8 ^ 2,
                b'a' ^ 3,
                b'b' ^ 4
            ]
        );
        // The reason is cut to 123 bytes at a character boundary.
        let f = close_frame(1001, &"r".repeat(200), None);
        assert_eq!(f.len(), 2 + 125);
        assert_eq!(f[1], 125);
        let reason = format!("{}é", "r".repeat(122));
        let f = close_frame(1001, &reason, None);
        assert_eq!(f.len(), 2 + 2 + 122);
        assert_eq!(&f[4..], "r".repeat(122).as_bytes());
        let reason = format!("{}é", "r".repeat(121));
        let f = close_frame(1001, &reason, Some(KEY));
        assert_eq!(f.len(), 2 + 4 + 125);
        assert_eq!(scan(MAX, &f), vec![close_event(Some(1001))]);
        let reason = "日本語".repeat(20);
        let f = close_frame(1001, &reason, None);
        let payload = std::str::from_utf8(&f[4..]).unwrap();
        assert_eq!(payload.len(), 123);
        assert!(reason.starts_with(payload));
    }

    #[test]
    fn encoder_forms() {
        assert_eq!(text_frame(b"hi", true, None), b"\x81\x02hi");
        assert_eq!(text_frame(b"hi", false, None), b"\x01\x02hi");
        assert_eq!(
            encode_frame(Opcode::Continuation, true, b"", None),
            b"\x80\x00"
        );
        assert_eq!(encode_frame(Opcode::Binary, true, b"", None), b"\x82\x00");
        assert_eq!(encode_frame(Opcode::Ping, true, b"", None), b"\x89\x00");
        assert_eq!(encode_frame(Opcode::Pong, true, b"", None), b"\x8a\x00");
        assert_eq!(
            text_frame(b"hi", true, Some([0, 0, 0, 0])),
            b"\x81\x82\x00\x00\x00\x00hi"
        );
        let f = text_frame(&[b'a'; 126], true, None);
        assert_eq!(&f[..4], &[0x81, 126, 0, 126]);
        let f = text_frame(&[b'a'; 65535], true, Some(KEY));
        assert_eq!(&f[..4], &[0x81, 0x80 | 126, 0xff, 0xff]);
        assert_eq!(&f[4..8], &KEY);
        let f = text_frame(&[b'a'; 65536], true, None);
        assert_eq!(&f[..10], &[0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
        assert_eq!(f.len(), 10 + 65536);
    }

    /// Each malformed header stops the scanner with its violation, reported once.
    #[test]
    fn protocol_errors() {
        use ProtocolViolation::*;
        let cases: Vec<(Vec<u8>, ProtocolViolation)> = vec![
            (vec![0xC1, 0x00], ReservedBits),
            (vec![0xA1, 0x00], ReservedBits),
            (vec![0x91, 0x00], ReservedBits),
            (vec![0x83, 0x00], UnknownOpcode(3)),
            (vec![0x87, 0x00], UnknownOpcode(7)),
            (vec![0x8B, 0x00], UnknownOpcode(11)),
            (vec![0x8F, 0x00], UnknownOpcode(15)),
            (vec![0x09, 0x00], FragmentedControl),
            (vec![0x08, 0x00], FragmentedControl),
            (vec![0x0A, 0x00], FragmentedControl),
            (vec![0x89, 126, 0, 126], ControlTooLong),
            (vec![0x88, 127, 0, 0, 0, 0, 0, 0, 0, 1], ControlTooLong),
            (vec![0x8A, 0xFE, 0, 1, 1, 2, 3, 4], ControlTooLong),
            (vec![0x81, 127, 0x80, 0, 0, 0, 0, 0, 0, 0], LengthTooLarge),
            (
                vec![0x82, 0xFF, 0xFF, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4],
                LengthTooLarge,
            ),
            (vec![0x80, 0x00], UnexpectedContinuation),
            (vec![0x00, 0x01, b'x'], UnexpectedContinuation),
        ];
        for (bad, violation) in cases {
            let mut s = text_frame(RESPONSE_CREATED.as_bytes(), true, None);
            s.extend(&bad);
            s.extend(text_frame(ERROR.as_bytes(), true, None));
            s.extend(bad);
            let want = vec![
                created(text_frame(RESPONSE_CREATED.as_bytes(), true, None).len()),
                RealtimeEvent::ProtocolError(violation),
            ];
            assert_eq!(scan_all_ways(MAX, &s), want, "{violation:?}");
        }
        // A new message inside a fragmented one.
        for op in [Opcode::Text, Opcode::Binary] {
            let mut s = text_frame(b"{\"type\":\"error\"", false, None);
            s.extend(frame(Opcode::Ping, true, b"", false));
            s.extend(encode_frame(op, true, b"x", None));
            s.extend(text_frame(ERROR.as_bytes(), true, None));
            assert_eq!(
                scan_all_ways(MAX, &s),
                vec![RealtimeEvent::ProtocolError(UnfinishedMessage)]
            );
        }
        // A continuation after a finished message.
        let mut s = text_frame(ERROR.as_bytes(), true, None);
        s.extend(frame(Opcode::Continuation, true, b"", false));
        assert_eq!(
            scan(MAX, &s),
            vec![
                error_event(Some("invalid_value")),
                RealtimeEvent::ProtocolError(UnexpectedContinuation)
            ]
        );
    }

    #[test]
    fn a_stopped_scanner_reads_nothing_more() {
        let mut s = RealtimeScanner::new(MAX);
        assert!(!s.is_stopped());
        let mut got = Vec::new();
        s.feed(&[0x81, 0x05, b'{'], |e| got.push(e));
        assert_eq!(got, vec![]);
        s.feed(&[b'}', b' ', b' ', b' ', 0xF1], |e| got.push(e));
        assert!(!s.is_stopped());
        s.feed(&[0x00], |e| got.push(e));
        assert_eq!(
            got,
            vec![RealtimeEvent::ProtocolError(
                ProtocolViolation::ReservedBits
            )]
        );
        assert!(s.is_stopped());
        for _ in 0..3 {
            s.feed(&text_frame(ERROR.as_bytes(), true, None), |e| {
                panic!("{e:?}")
            });
            s.feed(&close_frame(1000, "", None), |e| panic!("{e:?}"));
        }
        assert!(s.is_stopped());
        assert_eq!(s.message.capacity(), 0);
    }

    /// Random bytes never panic, never loop, never grow the buffer past the bound, and stop
    /// the scanner at most once.
    #[test]
    fn random_bytes_are_safe() {
        let mut rng = StdRng::seed_from_u64(6455);
        for round in 0..2000 {
            let max = rng.random_range(0..600);
            let mut s = RealtimeScanner::new(max);
            let mut errors = 0;
            let mut stream: Vec<u8> = Vec::new();
            // Mostly valid-looking frames with random corruption.
            for _ in 0..rng.random_range(1..6) {
                let payload: Vec<u8> = if rng.random_bool(0.5) {
                    let json = [RESPONSE_DONE, ERROR, RESPONSE_CREATED, SESSION_CREATED];
                    json[rng.random_range(0..4)].as_bytes().to_vec()
                } else {
                    (0..rng.random_range(0..300))
                        .map(|_| rng.random())
                        .collect()
                };
                let op = [
                    Opcode::Text,
                    Opcode::Continuation,
                    Opcode::Ping,
                    Opcode::Close,
                ][rng.random_range(0..4)];
                let mask = rng.random_bool(0.5).then(|| rng.random());
                stream.extend(encode_frame(op, rng.random_bool(0.7), &payload, mask));
            }
            for _ in 0..rng.random_range(0..4) {
                let at = rng.random_range(0..stream.len());
                stream[at] = rng.random();
            }
            let mut rest = &stream[..];
            while !rest.is_empty() {
                let n = rng.random_range(1..=rest.len().min(64));
                s.feed(&rest[..n], |e| {
                    if matches!(e, RealtimeEvent::ProtocolError(_)) {
                        errors += 1;
                    }
                });
                assert!(s.message.len() <= max, "round {round}");
                rest = &rest[n..];
            }
            assert!(errors <= 1, "round {round}");
            assert_eq!(errors == 1, s.is_stopped(), "round {round}");
        }
    }

    #[test]
    fn prefix_scan() {
        use PrefixScan::*;
        let cases: &[(&str, PrefixScan)] = &[
            ("", Incomplete),
            ("  \n", Incomplete),
            ("{", Incomplete),
            ("{\"ty", Incomplete),
            ("{\"type\"", Incomplete),
            ("{\"type\" ", Incomplete),
            ("{\"type\":", Incomplete),
            ("{\"type\": \"resp", Incomplete),
            ("{\"type\":\"error\"", Type(b"error")),
            ("\t{ \"type\" :\r\n\"\"", Type(b"")),
            ("{\"a\":", Incomplete),
            ("{\"a\":1", Incomplete),
            ("{\"a\":1 ", Incomplete),
            ("{\"a\":1,", Incomplete),
            ("{\"a\":tru", Incomplete),
            ("{\"a\":\"x\\", Incomplete),
            ("{\"a\":\"x\\\"", Incomplete),
            ("{\"a\":[1,{\"b\":\"]\"}", Incomplete),
            ("{\"a\":[1,{\"b\":\"]\"}],\"type\":\"x\"", Type(b"x")),
            (
                "{\"a\":{\"type\":\"inner\"},\"type\":\"outer\"",
                Type(b"outer"),
            ),
            ("{\"a\":\"\\\\\",\"type\":\"t\"", Type(b"t")),
            ("{\"a\":null,\"b\":-0.5e+3,\"type\":\"t\"", Type(b"t")),
            ("{\"a\":1}", NoType),
            ("{}", NoType),
            ("{,}", NoType),
            ("[", NoType),
            ("\"type\"", NoType),
            ("x", NoType),
            ("{\"type\":1", NoType),
            ("{\"type\":{\"a\":1}", NoType),
            ("{\"a\" 1", NoType),
            ("{\"a\":}", NoType),
            ("{\"a\":1;", NoType),
            ("{\"a\\\"\":1,\"type\":\"t\"", Unsure),
            ("{\"a\\", Unsure),
            ("{\"type\":\"a\\u0062\"", Unsure),
        ];
        for (text, want) in cases {
            assert_eq!(&prefix_type(text.as_bytes()), want, "{text}");
        }
    }

    #[test]
    fn json_skipping_steps() {
        assert_eq!(skip_value(b"", 0), Step::Incomplete);
        assert_eq!(skip_value(b"[]", 0), Step::Done(2));
        assert_eq!(skip_value(b"[[],{}] ", 0), Step::Done(7));
        assert_eq!(skip_value(b"[\"\\\"]\"]", 0), Step::Done(7));
        assert_eq!(skip_value(b"12,", 0), Step::Done(2));
        assert_eq!(skip_value(b"x]", 1), Step::Bad);
        assert_eq!(skip_string(b"\"ab\"", 0), Step::Done(4));
        assert_eq!(skip_string(b"\"a\\", 0), Step::Incomplete);
        assert_eq!(skip_string(b"\"a\\\"", 0), Step::Incomplete);
        assert_eq!(skip_string(b"\"a\\\"\"", 0), Step::Done(5));
        assert_eq!(skip_ws(b" \t\r\nx", 0), 4);
        assert_eq!(skip_ws(b"  ", 1), 2);
        assert_eq!(header_size(0x00), 2);
        assert_eq!(header_size(0x7D), 2);
        assert_eq!(header_size(0x7E), 4);
        assert_eq!(header_size(0x7F), 10);
        assert_eq!(header_size(0x80), 6);
        assert_eq!(header_size(0xFE), 8);
        assert_eq!(header_size(0xFF), 14);
    }

    #[test]
    fn debug_output() {
        let mut s = RealtimeScanner::new(100);
        s.feed(&text_frame(ERROR.as_bytes(), false, None), |_| {});
        let d = format!("{s:?}");
        assert!(d.starts_with("RealtimeScanner {"), "{d}");
        assert!(d.contains("max_message: 100"), "{d}");
        assert!(d.contains("Oversized") || d.contains("Skip"), "{d}");
        assert!(!d.contains("secret"), "{d}");
    }
}
