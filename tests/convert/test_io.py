"""The format readers' and writers' tests live in tests/formats/; this module keeps the helper that
other tests import from here."""

from tests.formats.orbax_testing import zarr_metadata  # noqa: F401
