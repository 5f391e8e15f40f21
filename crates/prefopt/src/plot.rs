//! PNG line plots shared by every command (placeholder).
