//! A small, strict reader of NumPy `.npy` files (format versions 1.0, 2.0 and 3.0): a
//! little-endian (or byte-sized) float or integer array in C order, nothing else. Object
//! arrays, big-endian data, Fortran order (for more than one dimension), structured dtypes
//! and trailing bytes are refused with a message that says what was found.
//!
//! Format: <https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html>.

/// The element type of an array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// `<f4`
    F32,
    /// `<f8`
    F64,
    /// A signed integer of this many bytes (`|i1`, `<i2`, `<i4`, `<i8`).
    Int(usize),
    /// An unsigned integer of this many bytes (`|u1`, `<u2`, `<u4`, `<u8`).
    Uint(usize),
}

impl Dtype {
    fn parse(descr: &str) -> Result<Dtype, String> {
        let (order, kind) = if descr.is_char_boundary(1) { descr.split_at(1) } else { ("", descr) };
        let dtype = match kind {
            "f4" => Dtype::F32,
            "f8" => Dtype::F64,
            "i1" => Dtype::Int(1),
            "i2" => Dtype::Int(2),
            "i4" => Dtype::Int(4),
            "i8" => Dtype::Int(8),
            "u1" => Dtype::Uint(1),
            "u2" => Dtype::Uint(2),
            "u4" => Dtype::Uint(4),
            "u8" => Dtype::Uint(8),
            _ => {
                return Err(format!(
                    "dtype {descr:?} is not supported (float32/float64 embeddings, integer labels)"
                ))
            }
        };
        let ok = match order {
            "<" => true,
            "|" => dtype.size() == 1,
            // `=` is native order: little-endian on every platform NumPy writes it on here.
            "=" => cfg!(target_endian = "little"),
            ">" if dtype.size() == 1 => true,
            _ => false,
        };
        if !ok {
            return Err(format!(
                "dtype {descr:?} is not little-endian; convert it with arr.astype('<{kind}')"
            ));
        }
        Ok(dtype)
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F64 => 8,
            Dtype::Int(n) | Dtype::Uint(n) => n,
        }
    }
}

/// A parsed `.npy` file: its shape, element type, and the raw little-endian data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Npy<'a> {
    /// The shape (C order).
    pub shape: Vec<usize>,
    /// The element type.
    pub dtype: Dtype,
    /// The elements' bytes, exactly `shape.product() * dtype.size()` of them.
    pub data: &'a [u8],
}

const MAGIC: &[u8] = b"\x93NUMPY";

impl<'a> Npy<'a> {
    /// Parses a whole file's bytes.
    pub fn parse(bytes: &'a [u8]) -> Result<Npy<'a>, String> {
        if bytes.len() < 10 || &bytes[..6] != MAGIC {
            return Err("not a .npy file (no \\x93NUMPY magic)".into());
        }
        let (major, minor) = (bytes[6], bytes[7]);
        let (header_len, start) = match major {
            1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10usize),
            2 | 3 => {
                if bytes.len() < 12 {
                    return Err("truncated .npy header".into());
                }
                let n = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
                (usize::try_from(n).map_err(|_| "header too long".to_string())?, 12)
            }
            _ => return Err(format!(".npy format version {major}.{minor} is not supported")),
        };
        let end = start
            .checked_add(header_len)
            .filter(|e| *e <= bytes.len())
            .ok_or_else(|| "truncated .npy header".to_string())?;
        let header = std::str::from_utf8(&bytes[start..end])
            .map_err(|_| "the .npy header is not text".to_string())?;
        let (descr, fortran, shape) = parse_header(header)?;
        let dtype = Dtype::parse(&descr)?;
        if fortran && shape.iter().filter(|d| **d > 1).count() > 1 {
            return Err("the array is in Fortran order; save it with np.ascontiguousarray".into());
        }
        let want = shape
            .iter()
            .try_fold(dtype.size(), |acc, d| acc.checked_mul(*d))
            .ok_or_else(|| "the shape is too large".to_string())?;
        let data = &bytes[end..];
        if data.len() != want {
            return Err(format!(
                "shape {shape:?} of {descr} needs {want} data bytes, the file has {}",
                data.len()
            ));
        }
        Ok(Npy { shape, dtype, data })
    }

    /// The elements as `f32` (only for `F32`).
    pub fn f32s(&self) -> Option<Vec<f32>> {
        (self.dtype == Dtype::F32).then(|| {
            self.data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })
    }

    /// The elements as `f64` (only for `F64`).
    pub fn f64s(&self) -> Option<Vec<f64>> {
        (self.dtype == Dtype::F64).then(|| {
            self.data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect()
        })
    }

    /// The elements as `i64` (integer dtypes only); `Err(index)` names the first `u8`
    /// element above `i64::MAX`.
    pub fn i64s(&self) -> Option<Result<Vec<i64>, usize>> {
        let size = self.dtype.size();
        let signed = match self.dtype {
            Dtype::Int(_) => true,
            Dtype::Uint(_) => false,
            Dtype::F32 | Dtype::F64 => return None,
        };
        let mut out = Vec::with_capacity(self.data.len() / size);
        for (i, c) in self.data.chunks_exact(size).enumerate() {
            let mut b = [0u8; 8];
            b[..size].copy_from_slice(c);
            if signed && (c[size - 1] & 0x80) != 0 {
                b[size..].iter_mut().for_each(|x| *x = 0xff);
            }
            let v = u64::from_le_bytes(b);
            if !signed && v > i64::MAX as u64 {
                return Some(Err(i));
            }
            out.push(v as i64);
        }
        Some(Ok(out))
    }
}

/// `{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }` → its three fields.
fn parse_header(header: &str) -> Result<(String, bool, Vec<usize>), String> {
    let bad = |why: &str| format!("malformed .npy header ({why}): {}", header.trim_end());
    let mut p = Parser { s: header.as_bytes(), i: 0 };
    p.space();
    if !p.eat(b'{') {
        return Err(bad("expected '{'"));
    }
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    loop {
        p.space();
        if p.eat(b'}') {
            break;
        }
        let key = p.string().ok_or_else(|| bad("expected a quoted key"))?;
        p.space();
        if !p.eat(b':') {
            return Err(bad("expected ':'"));
        }
        p.space();
        match key.as_str() {
            "descr" if descr.is_none() => {
                descr = Some(p.string().ok_or_else(|| bad("descr is not a simple dtype string"))?)
            }
            "fortran_order" if fortran.is_none() => {
                fortran = Some(p.boolean().ok_or_else(|| bad("fortran_order is not True/False"))?)
            }
            "shape" if shape.is_none() => {
                shape = Some(p.tuple().ok_or_else(|| bad("shape is not a tuple of integers"))?)
            }
            _ => return Err(bad(&format!("unexpected or repeated key {key:?}"))),
        }
        p.space();
        if !p.eat(b',') {
            p.space();
            if p.eat(b'}') {
                break;
            }
            return Err(bad("expected ',' or '}'"));
        }
    }
    if p.s[p.i..].iter().any(|c| !c.is_ascii_whitespace()) {
        return Err(bad("text after '}'"));
    }
    match (descr, fortran, shape) {
        (Some(d), Some(f), Some(s)) => Ok((d, f, s)),
        _ => Err(bad("descr, fortran_order and shape are all required")),
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn space(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn string(&mut self) -> Option<String> {
        let q = *self.s.get(self.i).filter(|c| **c == b'\'' || **c == b'"')?;
        let start = self.i + 1;
        let len = self.s[start..].iter().position(|c| *c == q)?;
        self.i = start + len + 1;
        String::from_utf8(self.s[start..start + len].to_vec()).ok()
    }

    fn boolean(&mut self) -> Option<bool> {
        for (word, v) in [(&b"True"[..], true), (&b"False"[..], false)] {
            if self.s[self.i..].starts_with(word) {
                self.i += word.len();
                return Some(v);
            }
        }
        None
    }

    fn tuple(&mut self) -> Option<Vec<usize>> {
        if !self.eat(b'(') {
            return None;
        }
        let mut dims = Vec::new();
        loop {
            self.space();
            if self.eat(b')') {
                return Some(dims);
            }
            let start = self.i;
            while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
                self.i += 1;
            }
            let text = std::str::from_utf8(&self.s[start..self.i]).ok()?;
            dims.push(text.parse().ok()?);
            self.space();
            if !self.eat(b',') {
                self.space();
                if self.eat(b')') {
                    return Some(dims);
                }
                return None;
            }
        }
    }
}

/// Writes a little-endian C-order `.npy` (version 1.0) of `f32`, `f64` or `i64` elements:
/// used by tests and the bench to make fixtures, with the header NumPy itself writes.
pub fn write(shape: &[usize], descr: &str, data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_text =
        if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_text}, }}");
    // Pad with spaces so that magic + version + length + header + '\n' is a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_file(shape: &[usize], v: &[f32]) -> Vec<u8> {
        let data: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        write(shape, "<f4", &data)
    }

    #[test]
    fn reads_what_numpy_writes() {
        // np.save of np.arange(6, dtype='<f4').reshape(2, 3), byte for byte.
        let mut file =
            b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"
                .to_vec();
        while file.len() < 127 {
            file.push(b' ');
        }
        file.push(b'\n');
        for i in 0..6 {
            file.extend_from_slice(&(i as f32).to_le_bytes());
        }
        assert_eq!(f32_file(&[2, 3], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]), file);
        let npy = Npy::parse(&file).expect("parse");
        assert_eq!(npy.shape, vec![2, 3]);
        assert_eq!(npy.f32s(), Some(vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]));
        assert_eq!(npy.f64s(), None);
    }

    #[test]
    fn integers_of_every_width() {
        let file = write(&[3], "|i1", &[0xff, 0x02, 0x80]);
        assert_eq!(Npy::parse(&file).expect("i1").i64s(), Some(Ok(vec![-1, 2, -128])));
        let file = write(&[2], "<u2", &[0xff, 0xff, 0x01, 0x00]);
        assert_eq!(Npy::parse(&file).expect("u2").i64s(), Some(Ok(vec![65535, 1])));
        let data: Vec<u8> = [-5i64, 7].iter().flat_map(|x| x.to_le_bytes()).collect();
        let file = write(&[2, 1], "<i8", &data);
        assert_eq!(Npy::parse(&file).expect("i8").i64s(), Some(Ok(vec![-5, 7])));
        let file = write(&[1], "<u8", &u64::MAX.to_le_bytes());
        assert_eq!(Npy::parse(&file).expect("u8").i64s(), Some(Err(0)));
    }

    #[test]
    fn refuses_what_it_does_not_read() {
        let header = |h: &str| {
            let mut f = b"\x93NUMPY\x01\x00".to_vec();
            f.extend_from_slice(&(h.len() as u16).to_le_bytes());
            f.extend_from_slice(h.as_bytes());
            f
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"hello".to_vec(), "not a .npy file"),
            (write(&[2], ">f4", &[0; 8]), "not little-endian"),
            (write(&[2], "<c8", &[0; 16]), "not supported"),
            (write(&[2], "<f4", &[0; 9]), "needs 8 data bytes, the file has 9"),
            (write(&[2, 2], "<f4", &[0; 12]), "needs 16 data bytes"),
            (
                header("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }\n"),
                "Fortran order",
            ),
            (header("{'descr': '<f4'}\n"), "all required"),
            (header("{'descr': '<f4', 'descr': '<f4'}\n"), "repeated key"),
            (header("{'descr': '<f4', 'fortran_order': False, 'shape': (2, x), }"), "shape"),
            (b"\x93NUMPY\x09\x00\x10\x00{}".to_vec(), "version 9.0"),
            (b"\x93NUMPY\x01\x00\xff\x00{}".to_vec(), "truncated"),
        ];
        for (bytes, want) in cases {
            let e = Npy::parse(&bytes).expect_err(want);
            assert!(e.contains(want), "{e:?} should say {want:?}");
        }
    }
}
