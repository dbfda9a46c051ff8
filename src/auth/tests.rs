//! Tests for JWT verification.
