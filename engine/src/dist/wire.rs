//! Little-endian framing for messages between ranks (step plans, hidden states, logits).

use super::DistError;

#[derive(Debug, Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// A writer with room for `bytes` (an MoE exchange knows its size up front).
    pub fn with_capacity(bytes: usize) -> Self {
        Writer(Vec::with_capacity(bytes))
    }
    pub fn f32s(&mut self, v: &[f32]) -> &mut Self {
        self.words(v, |x| x.to_le_bytes())
    }
    pub fn u32s(&mut self, v: &[u32]) -> &mut Self {
        self.words(v, |x| x.to_le_bytes())
    }
    /// A length, then each 4-byte value as `le` writes it, into one resize of the buffer (no
    /// growth check per value: hidden-state rows are most of what an expert-parallel group
    /// exchanges).
    fn words<T: Copy>(&mut self, v: &[T], le: impl Fn(T) -> [u8; 4]) -> &mut Self {
        self.u64(v.len() as u64);
        let at = self.0.len();
        self.0.resize(at + 4 * v.len(), 0);
        for (dst, x) in self.0[at..].chunks_exact_mut(4).zip(v) {
            dst.copy_from_slice(&le(*x));
        }
        self
    }
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u64(v.len() as u64);
        self.0.extend_from_slice(v);
        self
    }
    pub fn str(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }
    pub fn finish(self) -> Vec<u8> {
        self.0
    }
}

/// Reads what a [`Writer`] wrote; every read checks bounds (a peer's bytes are input).
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
    from: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8], from_rank: usize) -> Self {
        Reader {
            buf,
            at: 0,
            from: from_rank,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DistError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| DistError::Protocol {
                rank: self.from,
                reason: format!("message truncated at byte {} (wanted {n} more)", self.at),
            })?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }

    pub fn is_empty(&self) -> bool {
        self.at >= self.buf.len()
    }

    pub fn u32(&mut self) -> Result<u32, DistError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self) -> Result<u64, DistError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn len(&mut self, elem: usize) -> Result<usize, DistError> {
        let n = self.u64()? as usize;
        if n.saturating_mul(elem) > self.buf.len() - self.at {
            return Err(DistError::Protocol {
                rank: self.from,
                reason: format!("length {n} exceeds the message"),
            });
        }
        Ok(n)
    }

    pub fn f32s(&mut self) -> Result<Vec<f32>, DistError> {
        let mut out = Vec::new();
        self.f32s_into(&mut out)?;
        Ok(out)
    }

    /// Appends the next `f32s` field to `out` (no intermediate vector); returns its length.
    pub fn f32s_into(&mut self, out: &mut Vec<f32>) -> Result<usize, DistError> {
        let n = self.len(4)?;
        let bytes = self.take(n * 4)?;
        let at = out.len();
        out.resize(at + n, 0.0);
        for (dst, b) in out[at..].iter_mut().zip(bytes.chunks_exact(4)) {
            *dst = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        Ok(n)
    }

    pub fn u32s(&mut self) -> Result<Vec<u32>, DistError> {
        let n = self.len(4)?;
        Ok(self
            .take(n * 4)?
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    pub fn bytes(&mut self) -> Result<&'a [u8], DistError> {
        let n = self.len(1)?;
        self.take(n)
    }

    pub fn str(&mut self) -> Result<String, DistError> {
        let from = self.from;
        std::str::from_utf8(self.bytes()?)
            .map(str::to_owned)
            .map_err(|_| DistError::Protocol {
                rank: from,
                reason: "a text field is not UTF-8".into(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_truncation_is_an_error() {
        let mut w = Writer::default();
        w.u32(7)
            .f32s(&[1.5, -2.0])
            .u32s(&[3, 4, 5])
            .str("GPU-ab")
            .bytes(&[9, 8]);
        let bytes = w.finish();
        let mut r = Reader::new(&bytes, 2);
        assert_eq!(r.u32().unwrap(), 7);
        assert_eq!(r.f32s().unwrap(), vec![1.5, -2.0]);
        assert_eq!(r.u32s().unwrap(), vec![3, 4, 5]);
        assert_eq!(r.str().unwrap(), "GPU-ab");
        assert_eq!(r.bytes().unwrap(), &[9, 8]);
        assert!(r.is_empty());
        let mut short = Reader::new(&bytes[..bytes.len() - 2], 2);
        short.u32().unwrap();
        short.f32s().unwrap();
        short.u32s().unwrap();
        short.str().unwrap();
        assert!(short.bytes().unwrap_err().to_string().contains("rank 2"));
        let mut w = Writer::default();
        w.bytes(&[0xff, 0xfe]);
        let bad = w.finish();
        assert!(
            Reader::new(&bad, 1)
                .str()
                .unwrap_err()
                .to_string()
                .contains("UTF-8")
        );
    }

    #[test]
    fn arrays_are_a_length_then_little_endian_values_and_append_in_place() {
        let mut w = Writer::with_capacity(64);
        w.f32s(&[1.0, -0.5]).u32s(&[0x0102_0304]);
        let bytes = w.finish();
        let mut want = 2u64.to_le_bytes().to_vec();
        want.extend_from_slice(&1.0f32.to_le_bytes());
        want.extend_from_slice(&(-0.5f32).to_le_bytes());
        want.extend_from_slice(&1u64.to_le_bytes());
        want.extend_from_slice(&[4, 3, 2, 1]);
        assert_eq!(bytes, want);
        let mut out = vec![9.0];
        let mut r = Reader::new(&bytes, 0);
        assert_eq!(r.f32s_into(&mut out).unwrap(), 2);
        assert_eq!(out, vec![9.0, 1.0, -0.5]);
        // A length beyond the message is an error and leaves `out` as it was.
        let mut r = Reader::new(&bytes[..12], 3);
        assert!(
            r.f32s_into(&mut out)
                .unwrap_err()
                .to_string()
                .contains("rank 3")
        );
        assert_eq!(out.len(), 3);
    }
}
