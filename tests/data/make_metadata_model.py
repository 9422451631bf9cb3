"""Write the TFLite test models whose metadata Google's own writer (tflite-support) wrote.

Not run by the tests (tflite-support is not a dependency: its last release,
0.4.4, needs numpy < 2 and libusb). It documents how the committed file was
made, so that the reader in offload/card.py is checked against a file written
by the official ``tflite_support.metadata_writers`` and not only by our code.
Run it in a scratch environment:

    python -m venv /tmp/tfls && /tmp/tfls/bin/pip install tflite-support==0.4.4 "numpy<2" libusb-package
    # libusb-package ships libusb-1.0.so; the tflite-support extension wants the .so.0 name
    mkdir -p /tmp/tfls/lib && ln -sf /tmp/tfls/lib/python3.11/site-packages/libusb_package/libusb-1.0.so \
        /tmp/tfls/lib/libusb-1.0.so.0
    # the echo model (tests/card_models.py) needs ai-edge-litert: make it with the project's venv
    (cd tests && ../.venv/bin/python -c "import numpy as np; from card_models import echo_model; \
        echo_model('/tmp/echo_grey.tflite', 6, 6, 1, np.uint8, 1.0, 0)")
    LD_LIBRARY_PATH=/tmp/tfls/lib /tmp/tfls/bin/python tests/data/make_metadata_model.py /tmp/echo_grey.tflite

``weak_metadata.tflite``: artifacts/weak_int8.tflite with the image-classifier
writer's metadata: normalisation mean 127.5, std 127.5 (pixels to [-1, 1]),
colour space RGB (that writer always writes RGB), and the label file
``labels.txt`` (TENSOR_AXIS_LABELS, one label per line) packed into the zip
appended to the model.

``echo_grey_metadata.tflite``: a 6x6x1 uint8 echo model (input scale 1, zero
point 0; its output is its input) with metadata from the lower-level writer:
GRAYSCALE colour space, mean 10 and std 2, and two label files for the
output, ``labels_fr.txt`` (locale fr, listed first) and ``labels.txt``
(``id label`` form, ids in reverse order), so the reader must take the one
without a locale.
"""

import os
import sys
import tempfile

from tensorflow_lite_support.metadata import metadata_schema_py_generated as md_fb
from tensorflow_lite_support.metadata.python.metadata_writers import metadata_info, metadata_writer
from tflite_support.metadata_writers import image_classifier

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "..", "..", "artifacts", "weak_int8.tflite")
OUT = os.path.join(HERE, "weak_metadata.tflite")
LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
          "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

ECHO_OUT = os.path.join(HERE, "echo_grey_metadata.tflite")


def weak_metadata():
    with open(SOURCE, "rb") as f:
        model = f.read()
    with tempfile.TemporaryDirectory() as tmp:
        labels = os.path.join(tmp, "labels.txt")
        with open(labels, "w") as f:
            f.write("\n".join(LABELS) + "\n")
        writer = image_classifier.MetadataWriter.create_for_inference(model, [127.5], [127.5],
                                                                      [labels])
        data = writer.populate()
    with open(OUT, "wb") as f:
        f.write(data)
    print(f"wrote {OUT} ({len(data)} bytes)")


def echo_grey_metadata(echo_path):
    with open(echo_path, "rb") as f:
        model = f.read()
    with tempfile.TemporaryDirectory() as tmp:
        fr, en = os.path.join(tmp, "labels_fr.txt"), os.path.join(tmp, "labels.txt")
        with open(fr, "w") as f:
            f.write("\n".join(f"fr{i}" for i in range(36)) + "\n")
        with open(en, "w") as f:
            f.write("\n".join(f"{i} v{i}" for i in reversed(range(36))) + "\n")
        writer = metadata_writer.MetadataWriter.create_from_metadata_info(
            model,
            general_md=metadata_info.GeneralMd(name="echo", description="test model"),
            input_md=[metadata_info.InputImageTensorMd(
                name="image", norm_mean=[10.0], norm_std=[2.0],
                color_space_type=md_fb.ColorSpaceType.GRAYSCALE,
                tensor_type=writer_utils_tensor_type(model))],
            output_md=[metadata_info.ClassificationTensorMd(
                name="echo", label_files=[metadata_info.LabelFileMd(fr, locale="fr"),
                                          metadata_info.LabelFileMd(en)],
                tensor_type=writer_utils_tensor_type(model, output=True))],
            associated_files=[fr, en])
        data = writer.populate()
    with open(ECHO_OUT, "wb") as f:
        f.write(data)
    print(f"wrote {ECHO_OUT} ({len(data)} bytes)")


def writer_utils_tensor_type(model, output=False):
    from tensorflow_lite_support.metadata.python.metadata_writers import writer_utils

    types = (writer_utils.get_output_tensor_types if output else
             writer_utils.get_input_tensor_types)(model)
    return types[0]


if __name__ == "__main__":
    weak_metadata()
    if len(sys.argv) > 1:
        echo_grey_metadata(sys.argv[1])
