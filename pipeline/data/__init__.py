"""Reading a competition: the strict CSV reader, labels, images, the decode cache, duplicates."""
