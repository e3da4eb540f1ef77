"""Report bundles: writer, reader, manifest and renderers."""
