//! The byte layout of an [`EntityState`], as stored in Postgres (`bytea`)
//! and cached in Redis.
//!
//! A server decodes one state per (view, entity) it is asked for, so this is
//! on the hot path: a flat binary layout decodes about 30× faster than the
//! JSON it replaced (170 µs → a few µs for a 50-feature entity).
//!
//! Version 2, written now, is compact: integers are zigzag varints, tile
//! starts are stored as the step from the tile before and newest times as
//! the offset into their tile, and a tile whose sum, min and max are all
//! zero (every tile of a count, the commonest series) stores none of them.
//! A count tile takes about 6 bytes instead of version 1's 48, so an
//! active entity's state stays well under the size at which Postgres moves
//! it out of line (TOAST), and deltas, compaction and reads all move less.
//!
//! ```text
//! u8 version (2) | zz newest_ms
//! v series × { v key_len, key, v tiles × { u8 tag, zz Δstart, zz count, zz newest-start, [f64 sum, f64 min, f64 max if tag = 1] } }
//! v last   × { v name_len, name, zz at_ms, u8 tag, value }
//!   tag: 0 null | 1 zz i64 | 2 f64 | 3 v len + utf-8 | 4 u8 bool | 5 zz time
//! ```
//! (`v`: unsigned LEB128 varint; `zz`: zigzag varint; Δ and offsets wrap.)
//!
//! Version 1 (fixed-width little-endian: u16 counts and lengths, u32 tile
//! counts and string lengths, i64/f64 words, every tile 48 bytes) is still
//! read, so rows and cache entries written before stay readable; a server
//! must be upgraded before the ingest that writes version 2.
//!
//! The counts and lengths are bounded by the view file: at most 1000
//! features a view, names of at most 128 bytes, source fields (and so
//! series keys) of at most 255. Decoding trusts nothing: any bytes give a
//! state or [`Corrupt`], never a panic or a huge allocation
//! (`store/tests/codec_properties.rs`).

use std::collections::BTreeMap;

use crate::state::{EntityState, LastValue, Scalar, Tile};

const FIXED: u8 = 1;
const COMPACT: u8 = 2;

pub fn encode(state: &EntityState) -> Vec<u8> {
    let tiles: usize = state.series.values().map(Vec::len).sum();
    let mut out = Vec::with_capacity(16 + tiles * 8 + state.series.len() * 16 + state.last.len() * 32);
    out.push(COMPACT);
    put_int(&mut out, state.newest_ms);
    put_len(&mut out, state.series.len());
    for (key, tiles) in &state.series {
        put_str(&mut out, key);
        put_len(&mut out, tiles.len());
        let mut previous = 0i64;
        for t in tiles {
            let values = [t.sum, t.min, t.max];
            let zero = values.iter().all(|v| v.to_bits() == 0);
            out.push(u8::from(!zero));
            put_int(&mut out, t.start_ms.wrapping_sub(previous));
            put_int(&mut out, t.count);
            put_int(&mut out, t.newest_ms.wrapping_sub(t.start_ms));
            if !zero {
                for v in values {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            previous = t.start_ms;
        }
    }
    put_len(&mut out, state.last.len());
    for (name, last) in &state.last {
        put_str(&mut out, name);
        put_int(&mut out, last.at_ms);
        match &last.value {
            Scalar::Null => out.push(0),
            Scalar::Int(i) => {
                out.push(1);
                put_int(&mut out, *i);
            }
            Scalar::Double(d) => {
                out.push(2);
                out.extend_from_slice(&d.to_le_bytes());
            }
            Scalar::Str(s) => {
                out.push(3);
                put_str(&mut out, s);
            }
            Scalar::Bool(b) => {
                out.push(4);
                out.push(*b as u8);
            }
            Scalar::Time(ms) => {
                out.push(5);
                put_int(&mut out, *ms);
            }
        }
    }
    out
}

fn put_len(out: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn put_int(out: &mut Vec<u8>, i: i64) {
    put_len(out, ((i << 1) ^ (i >> 63)) as u64 as usize);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_len(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("corrupt feature state: {0}")]
pub struct Corrupt(&'static str);

/// Reads either version: `compact` says which.
struct Reader<'a> {
    bytes: &'a [u8],
    compact: bool,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Corrupt> {
        if self.bytes.len() < n {
            return Err(Corrupt("truncated"));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], Corrupt> {
        Ok(self.take(N)?.try_into().expect("length checked"))
    }
    fn u8(&mut self) -> Result<u8, Corrupt> {
        Ok(self.take(1)?[0])
    }
    fn f64(&mut self) -> Result<f64, Corrupt> {
        Ok(f64::from_le_bytes(self.array()?))
    }
    fn varint(&mut self) -> Result<u64, Corrupt> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(Corrupt("varint too long"))
    }
    fn int(&mut self) -> Result<i64, Corrupt> {
        if self.compact {
            let z = self.varint()?;
            Ok(((z >> 1) as i64) ^ -((z & 1) as i64))
        } else {
            Ok(i64::from_le_bytes(self.array()?))
        }
    }
    /// A count or a name's length (u16 in version 1).
    fn len(&mut self) -> Result<usize, Corrupt> {
        if self.compact { Ok(self.varint()? as usize) } else { Ok(u16::from_le_bytes(self.array()?) as usize) }
    }
    /// A tile count or a value's length (u32 in version 1).
    fn long_len(&mut self) -> Result<usize, Corrupt> {
        if self.compact { self.len() } else { Ok(u32::from_le_bytes(self.array()?) as usize) }
    }
    fn string(&mut self, len: usize) -> Result<String, Corrupt> {
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| Corrupt("invalid UTF-8"))
    }
    fn tile(&mut self, previous_start: i64) -> Result<Tile, Corrupt> {
        if !self.compact {
            return Ok(Tile {
                start_ms: self.int()?,
                count: self.int()?,
                sum: self.f64()?,
                min: self.f64()?,
                max: self.f64()?,
                newest_ms: self.int()?,
            });
        }
        let tag = self.u8()?;
        let start_ms = previous_start.wrapping_add(self.int()?);
        let count = self.int()?;
        let newest_ms = start_ms.wrapping_add(self.int()?);
        let (sum, min, max) = match tag {
            0 => (0.0, 0.0, 0.0),
            1 => (self.f64()?, self.f64()?, self.f64()?),
            _ => return Err(Corrupt("unknown tile tag")),
        };
        Ok(Tile { start_ms, count, sum, min, max, newest_ms })
    }
}

pub fn decode(bytes: &[u8]) -> Result<EntityState, Corrupt> {
    let mut r = Reader { bytes, compact: false };
    r.compact = match r.u8()? {
        FIXED => false,
        COMPACT => true,
        _ => return Err(Corrupt("unknown version")),
    };
    // The fewest bytes a tile takes, against allocations sized by a lying count.
    let min_tile = if r.compact { 4 } else { 48 };
    let newest_ms = r.int()?;
    let mut series = BTreeMap::new();
    for _ in 0..r.len()? {
        let len = r.len()?;
        let key = r.string(len)?;
        let count = r.long_len()?;
        if r.bytes.len() < count.saturating_mul(min_tile) {
            return Err(Corrupt("truncated tiles"));
        }
        let mut tiles = Vec::with_capacity(count);
        let mut previous = 0;
        for _ in 0..count {
            let tile = r.tile(previous)?;
            previous = tile.start_ms;
            tiles.push(tile);
        }
        series.insert(key, tiles);
    }
    let mut last = BTreeMap::new();
    for _ in 0..r.len()? {
        let len = r.len()?;
        let name = r.string(len)?;
        let at_ms = r.int()?;
        let value = match r.u8()? {
            0 => Scalar::Null,
            1 => Scalar::Int(r.int()?),
            2 => Scalar::Double(r.f64()?),
            3 => {
                let len = r.long_len()?;
                Scalar::Str(r.string(len)?)
            }
            4 => Scalar::Bool(r.u8()? != 0),
            5 => Scalar::Time(r.int()?),
            _ => return Err(Corrupt("unknown value tag")),
        };
        last.insert(name, LastValue { at_ms, value });
    }
    if !r.bytes.is_empty() {
        return Err(Corrupt("trailing bytes"));
    }
    Ok(EntityState { newest_ms, series, last })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_state(rng: &mut impl Rng) -> EntityState {
        let mut s = EntityState { newest_ms: rng.random(), ..Default::default() };
        for i in 0..rng.random_range(0..5) {
            let tiles = (0..rng.random_range(0..30))
                .map(|_| Tile {
                    start_ms: rng.random(),
                    count: rng.random(),
                    sum: rng.random(),
                    min: rng.random(),
                    max: -rng.random::<f64>(),
                    newest_ms: rng.random(),
                })
                .collect();
            s.series.insert(format!("field{i}@{}", rng.random::<u16>()), tiles);
        }
        let values = [
            Scalar::Null,
            Scalar::Int(rng.random()),
            Scalar::Double(rng.random()),
            Scalar::Str("é ✓ \0 text".into()),
            Scalar::Bool(true),
            Scalar::Time(rng.random()),
        ];
        for (i, v) in values.into_iter().enumerate() {
            if rng.random_bool(0.7) {
                s.last.insert(format!("last_{i}"), LastValue { at_ms: rng.random(), value: v });
            }
        }
        s
    }

    /// Every state round-trips, and reads back from version 1 as written
    /// before (`encode_v1`).
    #[test]
    fn round_trips_random_states_in_both_versions() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..500 {
            let state = random_state(&mut rng);
            assert_eq!(decode(&encode(&state)), Ok(state.clone()));
            assert_eq!(decode(&encode_v1(&state)), Ok(state));
        }
    }

    /// Version 1, as written before: rows and cache entries in this layout
    /// must still read.
    fn encode_v1(state: &EntityState) -> Vec<u8> {
        let str16 = |out: &mut Vec<u8>, s: &str| {
            out.extend_from_slice(&(s.len() as u16).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        };
        let mut out = vec![FIXED];
        out.extend_from_slice(&state.newest_ms.to_le_bytes());
        out.extend_from_slice(&(state.series.len() as u16).to_le_bytes());
        for (key, tiles) in &state.series {
            str16(&mut out, key);
            out.extend_from_slice(&(tiles.len() as u32).to_le_bytes());
            for t in tiles {
                for word in [t.start_ms, t.count].map(i64::to_le_bytes).into_iter().chain([t.sum, t.min, t.max].map(f64::to_le_bytes)) {
                    out.extend_from_slice(&word);
                }
                out.extend_from_slice(&t.newest_ms.to_le_bytes());
            }
        }
        out.extend_from_slice(&(state.last.len() as u16).to_le_bytes());
        for (name, last) in &state.last {
            str16(&mut out, name);
            out.extend_from_slice(&last.at_ms.to_le_bytes());
            match &last.value {
                Scalar::Null => out.push(0),
                Scalar::Int(i) => out.extend([1].into_iter().chain(i.to_le_bytes())),
                Scalar::Double(d) => out.extend([2].into_iter().chain(d.to_le_bytes())),
                Scalar::Str(s) => {
                    out.push(3);
                    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
                    out.extend_from_slice(s.as_bytes());
                }
                Scalar::Bool(b) => out.extend([4, *b as u8]),
                Scalar::Time(ms) => out.extend([5].into_iter().chain(ms.to_le_bytes())),
            }
        }
        out
    }

    /// A count's tiles (sum, min and max all zero) take a few bytes each:
    /// 50 tiles of a 10 s window, and the entity's three `last`-free series.
    #[test]
    fn count_tiles_are_a_few_bytes() {
        let now = 1_795_600_800_000i64;
        let tiles: Vec<Tile> = (0..50)
            .map(|i| Tile { start_ms: now + i * 200, count: 3, sum: 0.0, min: 0.0, max: 0.0, newest_ms: now + i * 200 + 150 })
            .collect();
        let state = EntityState { newest_ms: now, series: BTreeMap::from([("*@200".to_string(), tiles)]), last: BTreeMap::new() };
        let bytes = encode(&state);
        assert!(bytes.len() < 50 * 8, "{} bytes for 50 count tiles", bytes.len());
        assert!(encode_v1(&state).len() > 50 * 48);
        assert_eq!(decode(&bytes), Ok(state));
    }

    #[test]
    fn refuses_damaged_bytes_without_panicking() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        let bytes = encode(&random_state(&mut rng));
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "prefix of {cut} bytes");
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert_eq!(decode(&extra), Err(Corrupt("trailing bytes")));
        assert_eq!(decode(&[3]), Err(Corrupt("unknown version")));
    }
}
