//! Properties of the state codec (`freshet_store::codec`) on arbitrary and
//! adversarial input: decoding any bytes never panics, and every state
//! round-trips exactly. `PROPTEST_CASES` sets the number of cases (256 by
//! default); the bench runner can ask for a longer run.

use freshet_store::{
    codec::{decode, encode},
    state::{EntityState, LastValue, Scalar, Tile},
};
use proptest::{collection::btree_map, collection::vec, prelude::*};

/// Text of every width: ASCII, 2-, 3- and 4-byte characters, controls, NUL.
fn text(max: usize) -> impl Strategy<Value = String> {
    vec(prop_oneof![any::<char>(), Just('é'), Just('✓'), Just('😀'), Just('\0')], 0..max).prop_map(|c| c.into_iter().collect())
}

fn scalar() -> impl Strategy<Value = Scalar> {
    prop_oneof![
        Just(Scalar::Null),
        any::<i64>().prop_map(Scalar::Int),
        any::<f64>().prop_map(Scalar::Double),
        text(64).prop_map(Scalar::Str),
        any::<bool>().prop_map(Scalar::Bool),
        any::<i64>().prop_map(Scalar::Time),
    ]
}

fn tile() -> impl Strategy<Value = Tile> {
    (any::<i64>(), any::<i64>(), any::<f64>(), any::<f64>(), any::<f64>(), any::<i64>())
        .prop_map(|(start_ms, count, sum, min, max, newest_ms)| Tile { start_ms, count, sum, min, max, newest_ms })
}

fn state() -> impl Strategy<Value = EntityState> {
    (
        any::<i64>(),
        btree_map(text(40), vec(tile(), 0..20), 0..6),
        btree_map(text(40), (any::<i64>(), scalar()).prop_map(|(at_ms, value)| LastValue { at_ms, value }), 0..6),
    )
        .prop_map(|(newest_ms, series, last)| EntityState { newest_ms, series, last })
}

/// A valid encoding damaged: bytes flipped, cut, inserted.
fn damaged() -> impl Strategy<Value = Vec<u8>> {
    (state(), vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..8)).prop_map(|(s, edits)| {
        let mut bytes = encode(&s);
        for (at, byte, kind) in edits {
            let i = at.index(bytes.len() + 1);
            match kind {
                0 if i < bytes.len() => bytes[i] = byte,
                1 => bytes.truncate(i),
                _ => bytes.insert(i, byte),
            }
        }
        bytes
    })
}

/// A header that promises far more than follows: counts and lengths near
/// their maximum, which must not turn into allocations.
fn lying_header() -> impl Strategy<Value = Vec<u8>> {
    (any::<u16>(), any::<u16>(), any::<u32>(), vec(any::<u8>(), 0..64)).prop_map(|(series, key_len, tiles, tail)| {
        let mut b = vec![1];
        b.extend_from_slice(&0i64.to_le_bytes());
        b.extend_from_slice(&series.to_le_bytes());
        b.extend_from_slice(&key_len.to_le_bytes());
        b.extend(std::iter::repeat_n(b'k', (key_len as usize).min(16)));
        b.extend_from_slice(&tiles.to_le_bytes());
        b.extend(tail);
        b
    })
}

proptest! {
    #[test]
    fn every_state_round_trips(s in state()) {
        let bytes = encode(&s);
        let back = decode(&bytes).expect("an encoding decodes");
        // Compared as bytes, so NaN sums compare equal bit for bit.
        prop_assert_eq!(encode(&back), bytes);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop_oneof![vec(any::<u8>(), 0..512), damaged(), lying_header()]) {
        if let Ok(state) = decode(&bytes) {
            // Whatever decodes is a state that encodes and decodes again.
            prop_assert!(decode(&encode(&state)).is_ok());
        }
    }
}
