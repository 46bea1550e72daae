"""This package's descriptor pool, apart from protobuf's default pool."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
