"""Config model and the TOML loader with field-technician friendly errors."""
