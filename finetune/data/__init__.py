"""Training and evaluation input: from the shard folder data_prep wrote to uint8 batches on the device.

One module per concern; callers import a name from the module that owns it (nothing is re-exported here):
- manifest.py:      the manifest (Manifest, Split, load_manifest) and the checks that shards hold what the
                    streams need (check_shards, shard_contents, sample_fields, BadShard);
- transforms.py:    CPU transforms (decode, train_transform, the OpenCV path, eval_transform), the uint8 batch
                    buffers (batch_buffer, collate) and DeviceNormalizer;
- device_decode.py: --decode-on device: JPEG headers in the workers, nvjpeg on the device (DeviceDecoder);
- streams.py:       the WebDataset train and eval streams (TrainStream + TrainSettings, EvalStream) and the
                    DataLoader over them (make_loader, auto_workers);
- dali.py:          --loader dali, the other training input pipeline (NVIDIA DALI; optional extra).
"""
