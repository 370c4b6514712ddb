//! The one rule for entity keys, enforced where keys enter (ingest, which
//! dead-letters a record whose key breaks it) and where they are asked for
//! (the server, which refuses the request), so that nothing is stored that
//! can never be read back.

/// The longest string key, in bytes of UTF-8.
pub const MAX_STRING_KEY_BYTES: usize = 1024;

/// Checks a string entity key; the error says the rule and what broke it.
pub fn check_string_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_STRING_KEY_BYTES {
        return Err(format!("string keys must be 1 to {MAX_STRING_KEY_BYTES} bytes, this one has {}", key.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_1_to_1024_bytes_pass() {
        assert!(check_string_key("a").is_ok());
        assert!(check_string_key(&"x".repeat(MAX_STRING_KEY_BYTES)).is_ok());
        // Bytes, not characters: 512 two-byte characters fill it exactly.
        assert!(check_string_key(&"é".repeat(512)).is_ok());
    }

    #[test]
    fn empty_and_long_keys_are_refused_with_the_rule() {
        for key in [String::new(), "x".repeat(MAX_STRING_KEY_BYTES + 1), "é".repeat(513)] {
            let message = check_string_key(&key).unwrap_err();
            assert!(message.starts_with("string keys must be 1 to 1024 bytes"), "{message}");
            assert!(message.ends_with(&format!("has {}", key.len())), "{message}");
        }
    }
}
