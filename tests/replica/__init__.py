"""Tests of running several replicas on one stream."""
