"""COCO instances reading (what each annotation becomes, each kind of bad annotation named or counted) and
the Pillow drawing of boxes and masks used by `predict --draw`."""

import json

import numpy as np
import pytest
from PIL import Image

from mixtune.data.badsamples import BadSamples
from mixtune.data.formats.coco_instances import read_coco_instances
from mixtune.errors import DataError
from mixtune.infer.draw import colour, draw_boxes, draw_masks


def instances_file(tmp_path, annotations, images=None, write_images=True):
    images = images or [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
                        {"id": 2, "file_name": "b.png", "width": 40, "height": 30}]
    if write_images:
        for img in images:
            Image.new("RGB", (img["width"], img["height"])).save(tmp_path / img["file_name"])
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "circle"}, {"id": 7, "name": "square"}]}))
    return str(path)


GOOD = [{"id": 10, "image_id": 1, "bbox": [1, 2, 10, 5], "category_id": 1, "iscrowd": 0, "area": 50.0,
         "segmentation": [[1, 2, 11, 2, 11, 7]]},
        {"id": 11, "image_id": 2, "bbox": [0, 0, 40, 30], "category_id": 7, "iscrowd": 1,
         "segmentation": {"size": [30, 40], "counts": "abc"}},
        {"id": 12, "image_id": 1, "bbox": [20.5, 3, 4, 4], "category_id": 7}]


def test_reads_images_annotations_and_categories(tmp_path):
    coco = read_coco_instances(instances_file(tmp_path, GOOD))
    assert coco.categories == {1: "circle", 7: "square"}
    a, b = coco.images
    assert (a.path, a.width, a.height, a.id) == (str(tmp_path / "a.png"), 40, 30, 1)
    assert [(x.bbox, x.category_id, x.iscrowd, x.index, x.id) for x in a.annotations] == [
        ((1.0, 2.0, 10.0, 5.0), 1, 0, 0, 10), ((20.5, 3.0, 4.0, 4.0), 7, 0, 2, 12)]
    assert a.annotations[0].area == 50.0 and a.annotations[0].segmentation == [[1, 2, 11, 2, 11, 7]]
    assert b.annotations[0].segmentation == {"size": [30, 40], "counts": "abc"}  # kept raw
    assert b.annotations[0].iscrowd == 1


BAD = [
    ({"image_id": 1, "bbox": [35, 2, 10, 5], "category_id": 1}, "bbox", "outside"),
    ({"image_id": 1, "bbox": [1, 2, -3, 5], "category_id": 1}, "bbox", "non-positive size"),
    ({"image_id": 1, "bbox": [1, 2, 3], "category_id": 1}, "bbox", "[x, y, w, h]"),
    ({"image_id": 1, "bbox": [1, 2, 3, 4], "category_id": 3}, "category_id", "unknown category_id 3"),
    ({"image_id": 9, "bbox": [1, 2, 3, 4], "category_id": 1}, "image_id", "not in the file's 'images'"),
    ({"image_id": 1, "category_id": 1}, "bbox", "missing 'bbox'"),
    ({"image_id": 1, "bbox": [1, 2, 3, 4], "category_id": 1, "iscrowd": 2}, "iscrowd", "0 or 1"),
]


@pytest.mark.parametrize("ann,field,reason", BAD)
def test_bad_annotation_names_file_index_and_field(tmp_path, ann, field, reason):
    path = instances_file(tmp_path, [GOOD[0], ann])
    with pytest.raises(DataError) as e:
        read_coco_instances(path)
    assert (e.value.file, e.value.index, e.value.field) == (path, 1, field)
    assert reason in e.value.reason


def test_bad_annotations_and_missing_images_are_skipped_and_counted(tmp_path):
    path = instances_file(tmp_path, GOOD + [ann for ann, _, _ in BAD])
    (tmp_path / "b.png").unlink()
    bad = BadSamples("skip")
    coco = read_coco_instances(path, bad=bad)
    assert [img.id for img in coco.images] == [1]  # b.png is missing: image 2 skipped with its annotation
    assert [x.id for x in coco.images[0].annotations] == [10, 12]
    assert len(bad.records) == 1 + len(BAD)
    assert [r["field"] for r in bad.records] == ["images.file_name"] + [f for _, f, _ in BAD]


def test_missing_image_file_is_an_error_by_default(tmp_path):
    path = instances_file(tmp_path, GOOD)
    (tmp_path / "a.png").unlink()
    with pytest.raises(DataError, match="image file not found") as e:
        read_coco_instances(path)
    assert (e.value.index, e.value.field) == (0, "images.file_name")
    assert len(read_coco_instances(path, check_files=False).images) == 2


def test_file_shape_errors(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DataError, match="categories"):
        read_coco_instances(str(path))
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1}]}))
    with pytest.raises(DataError, match="non-empty 'name'"):
        read_coco_instances(str(path))


def test_draw_boxes_outlines_each_box_in_its_colour():
    image = Image.new("RGB", (64, 48), (0, 0, 0))
    out = draw_boxes(image, [[10, 20, 40, 40], [50, 30, 60, 44]], labels=["circle", "square"], scores=[0.9, 0.5],
                     width=1)
    px = np.asarray(out)
    assert tuple(px[30, 10]) == colour(0) and tuple(px[40, 25]) == colour(0)  # left and bottom edges
    assert tuple(px[30, 25]) == (0, 0, 0)  # inside stays
    assert tuple(px[40, 60]) == colour(1) and tuple(px[44, 55]) == colour(1)
    assert px[10:18, 10:30].any()  # the caption above the first box
    assert np.asarray(image).sum() == 0  # the input is not drawn on


def test_draw_masks_blends_only_inside_the_mask():
    image = Image.new("RGB", (6, 4), (100, 100, 100))
    mask = np.zeros((4, 6), dtype=bool)
    mask[1:3, 2:4] = True
    px = np.asarray(draw_masks(image, [mask], alpha=0.5)).astype(int)
    expected = np.round((np.array([100, 100, 100]) + np.array(colour(0))) / 2).astype(int)
    assert (px[1, 2] == expected).all() and (px[0, 0] == 100).all()
    assert (px[mask] == expected).all() and (px[~mask] == 100).all()
    with pytest.raises(ValueError, match="mask 0 is 5x4"):
        draw_masks(image, [np.zeros((4, 5), dtype=bool)])
