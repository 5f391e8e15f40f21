//! Progress bars on stderr (placeholder).
