//! Where records become features: decoding (`decode`) and applying the
//! resulting events to per-entity state (`apply`); `object` is how decoding
//! reads JSON.

pub mod apply;
pub mod decode;
mod object;
