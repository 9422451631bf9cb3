"""Write tests/data/weak_metadata.tflite: the committed weak model with TFLite metadata written by Google's own writer.

Not run by the tests (tflite-support is not a dependency: its last release,
0.4.4, needs numpy < 2 and libusb). It documents how the committed file was
made, so that the reader in offload/card.py is checked against a file written
by the official ``tflite_support.metadata_writers`` and not only by our code.
Run it in a scratch environment:

    python -m venv /tmp/tfls && /tmp/tfls/bin/pip install tflite-support==0.4.4 "numpy<2" libusb-package
    # libusb-package ships libusb-1.0.so; the tflite-support extension wants the .so.0 name
    mkdir -p /tmp/tfls/lib && ln -sf /tmp/tfls/lib/python3.11/site-packages/libusb_package/libusb-1.0.so \
        /tmp/tfls/lib/libusb-1.0.so.0
    LD_LIBRARY_PATH=/tmp/tfls/lib /tmp/tfls/bin/python tests/data/make_metadata_model.py

The metadata says: normalisation mean 127.5, std 127.5 (pixels to [-1, 1]),
colour space RGB (the image-classifier writer always writes RGB), and the
label file ``labels.txt`` (TENSOR_AXIS_LABELS, one label per line) packed
into the zip appended to the model.
"""

import os
import tempfile

from tflite_support.metadata_writers import image_classifier

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "..", "..", "artifacts", "weak_int8.tflite")
OUT = os.path.join(HERE, "weak_metadata.tflite")
LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
          "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

with open(SOURCE, "rb") as f:
    model = f.read()
with tempfile.TemporaryDirectory() as tmp:
    labels = os.path.join(tmp, "labels.txt")
    with open(labels, "w") as f:
        f.write("\n".join(LABELS) + "\n")
    writer = image_classifier.MetadataWriter.create_for_inference(model, [127.5], [127.5], [labels])
    data = writer.populate()
with open(OUT, "wb") as f:
    f.write(data)
print(f"wrote {OUT} ({len(data)} bytes)")
