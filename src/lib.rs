//! End-to-end tests and examples of diffdfq live in tests/ and examples/.
