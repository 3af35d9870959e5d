"""Small offline fixtures for the data pipeline tests."""
