//! Canonical encodings: fixed-width big-endian integers, fixed-size byte strings, and
//! length-prefixed fields only where a value is variable by nature (identifiers, lists).
//!
//! Every signed message starts with a one-byte format version. Decoding is strict: an
//! encoding decodes only if re-encoding the result gives back the same bytes, so each value
//! has exactly one signed form.

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ended before the value did.
    #[error("truncated input")]
    Truncated,
    /// Bytes were left over after the value.
    #[error("{0} trailing bytes")]
    TrailingBytes(usize),
    /// The version byte is not one this code knows.
    #[error("unknown format version {0}")]
    UnknownVersion(u8),
    /// A field holds a value that is not allowed (named).
    #[error("invalid field `{0}`")]
    InvalidField(&'static str),
    /// A length prefix exceeds the field's bound (named).
    #[error("field `{0}` is too long")]
    TooLong(&'static str),
}

/// Appends canonical fields to a buffer.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// A writer with room for `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        Writer { buf: Vec::with_capacity(capacity) }
    }
    /// One byte.
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    /// Big-endian `u16`.
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    /// Big-endian `u32`.
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    /// Big-endian `u64`.
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    /// Big-endian `u128`.
    pub fn u128(&mut self, v: u128) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    /// Raw bytes of a fixed-size field.
    pub fn bytes(&mut self, v: &[u8]) {
        self.buf.extend_from_slice(v);
    }
    /// A byte string with a one-byte length prefix (callers bound it below 256).
    pub fn short_bytes(&mut self, v: &[u8]) {
        debug_assert!(v.len() <= usize::from(u8::MAX));
        self.buf.push(v.len() as u8);
        self.buf.extend_from_slice(v);
    }
    /// A byte string with a two-byte length prefix (callers bound it below 65536).
    pub fn long_bytes(&mut self, v: &[u8]) {
        debug_assert!(v.len() <= usize::from(u16::MAX));
        self.u16(v.len() as u16);
        self.buf.extend_from_slice(v);
    }
    /// The bytes written.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads canonical fields from a byte slice.
#[derive(Debug)]
pub struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes }
    }
    /// Takes the next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }
    /// Takes a fixed-size array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    /// One byte.
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }
    /// Big-endian `u16`.
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    /// Big-endian `u32`.
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    /// Big-endian `u64`.
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    /// Big-endian `u128`.
    pub fn u128(&mut self) -> Result<u128, DecodeError> {
        Ok(u128::from_be_bytes(self.array()?))
    }
    /// A byte string with a one-byte length prefix, at most `max` long.
    pub fn short_bytes(
        &mut self,
        field: &'static str,
        max: usize,
    ) -> Result<&'a [u8], DecodeError> {
        let len = usize::from(self.u8()?);
        if len > max {
            return Err(DecodeError::TooLong(field));
        }
        self.take(len)
    }
    /// A byte string with a two-byte length prefix, at most `max` long.
    pub fn long_bytes(&mut self, field: &'static str, max: usize) -> Result<&'a [u8], DecodeError> {
        let len = usize::from(self.u16()?);
        if len > max {
            return Err(DecodeError::TooLong(field));
        }
        self.take(len)
    }
    /// Checks that the version byte equals `expected`.
    pub fn version(&mut self, expected: u8) -> Result<(), DecodeError> {
        match self.u8()? {
            v if v == expected => Ok(()),
            v => Err(DecodeError::UnknownVersion(v)),
        }
    }
    /// Fails unless every byte was consumed.
    pub fn finish(self) -> Result<(), DecodeError> {
        match self.bytes.len() {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }
}

/// A value with one canonical byte encoding.
pub trait Encode: Sized {
    /// Appends the canonical encoding.
    fn encode_into(&self, w: &mut Writer);
    /// Reads one value; the caller checks for trailing bytes.
    fn decode_from(r: &mut Reader<'_>) -> Result<Self, DecodeError>;

    /// The canonical encoding.
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        self.encode_into(&mut w);
        w.finish()
    }

    /// Decodes exactly one value from `bytes` (no trailing bytes).
    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let v = Self::decode_from(&mut r)?;
        r.finish()?;
        Ok(v)
    }
}
