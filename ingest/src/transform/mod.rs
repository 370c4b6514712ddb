//! Where records become features: decoding (`decode`) and applying the
//! resulting events to per-entity state (`apply`).

pub mod apply;
pub mod decode;
