"""Real-service and test-media helpers shared by the integration and end-to-end tests."""
