#!/usr/bin/env python3
"""Write the three prompt sets of this folder from the hand-written parts below.

Usage (from the repository root)::

    python tools/make_prompts.py           # rewrite the .jsonl files
    python tools/make_prompts.py --check   # exit 1 if they are out of date

Every prompt is a structured Ideogram 4 caption (``high_level_description`` plus
``compositional_deconstruction`` with a ``background`` and typed ``elements``),
following the schema and writing rules of the prompt enhancer shipped with the
diffusers Ideogram 4 pipeline: concrete colours, materials and positions, one
element per subject, no mood words.

How the sets are composed:

* Scene categories (photography, illustration, people, product, scene,
  abstract, architecture, food, nature) combine a hand-written subject, a
  compatible hand-written setting (background plus optional supporting
  elements) and a medium. Each category's subjects are split between the
  calibration set and the quality set, so the two sets never share a main
  subject.
* Design categories (poster, logo, typography, multilingual_text, ui) fill
  hand-written briefs (headlines, brand names, phrases in several scripts,
  app screens) into layout templates. Every brief is used by exactly one set.
* The text set holds exactly one text element per prompt, and ``target_text``
  is that element's verbatim text, so OCR exact match has a single target.

Nothing depends on the environment: a fixed ``random.Random`` seed drives every
choice, lists are iterated in source order, and the output is byte-identical on
every run. Records are interleaved by category, so any prefix of a file stays
spread over the categories.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

PROMPTS = Path(__file__).resolve().parents[1] / "calibration_prompts"
GENERATOR_SEED = 20250611

# (file stem, id prefix, first seed)
SETS = {
    "calibration": ("cal", 100_000),
    "evaluation_quality": ("evq", 200_000),
    "evaluation_text": ("evt", 300_000),
}

SCENE_QUOTA = {"calibration": 10, "evaluation_quality": 15}
DESIGN_QUOTA = {"calibration": 8, "evaluation_quality": 13}
TEXT_QUOTA = {
    "typography": 16,
    "poster": 14,
    "logo": 14,
    "multilingual_text": 20,
    "ui": 12,
    "product": 8,
    "photography": 6,
    "food": 5,
    "architecture": 5,
}
# Order used to interleave records within a file.
CATEGORY_ORDER = [
    "photography",
    "typography",
    "people",
    "poster",
    "product",
    "multilingual_text",
    "scene",
    "logo",
    "food",
    "ui",
    "nature",
    "illustration",
    "architecture",
    "abstract",
]

SQUARE = (1024, 1024)
LAND_4_3 = (1152, 896)
PORT_3_4 = (896, 1152)
LAND_3_2 = (1216, 832)
PORT_2_3 = (832, 1216)
LAND_16_9 = (1344, 768)
PORT_9_16 = (768, 1344)

SIZES = {
    "photography": [LAND_3_2, LAND_4_3, PORT_2_3, SQUARE],
    "illustration": [SQUARE, LAND_4_3, PORT_3_4],
    "people": [PORT_2_3, PORT_3_4, SQUARE],
    "product": [SQUARE, PORT_3_4, LAND_4_3],
    "scene": [LAND_16_9, LAND_3_2, LAND_4_3],
    "abstract": [SQUARE, PORT_3_4, LAND_16_9],
    "architecture": [LAND_3_2, PORT_2_3, LAND_4_3],
    "food": [SQUARE, LAND_4_3, PORT_3_4],
    "nature": [LAND_3_2, LAND_16_9, LAND_4_3],
    "poster": [PORT_2_3, PORT_3_4],
    "logo": [SQUARE],
    "typography": [LAND_16_9, LAND_3_2, SQUARE],
    "multilingual_text": [LAND_3_2, SQUARE, PORT_2_3],
}


# --------------------------------------------------------------------------- parts


@dataclass
class Subject:
    noun: str  # opens the high-level description
    desc: str
    only: tuple[str, ...] = ()  # compatible setting keys; empty means all
    extras: bool = True  # whether supporting elements may be added


@dataclass
class Setting:
    phrase: str  # follows the subject in the high-level description
    background: str
    extras: list[str] = field(default_factory=list)


@dataclass
class SceneCategory:
    mediums: list[str]
    subjects: list[Subject]
    settings: dict[str, Setting]


S = Subject
T = Setting

PHOTOGRAPHY = SceneCategory(
    mediums=[
        "a 35mm color film street photograph",
        "a candid phone photograph with an off-center composition",
        "a medium-format documentary photograph",
        "a wide-angle travel photograph",
        "an editorial magazine photograph with a centered composition",
    ],
    subjects=[
        S("A vintage red bicycle", "Vintage red steel-frame bicycle with a brown leather saddle, chrome fenders and a wicker basket strapped to the handlebars, leaning on its kickstand slightly left of center, the front wheel turned a little toward the viewer and a small brass bell on the bar."),
        S("A grey tabby cat", "Grey tabby cat with a white chest and white front paws sitting upright in the lower-right third of the frame, tail curled around its feet, green eyes looking straight at the camera and one ear turned sideways."),
        S("A mint-green scooter", "Mint-green 1960s Vespa scooter with a cream seat, a round chrome headlamp and a small rear luggage rack, parked at an angle in the center of the frame with its front wheel pointing toward the lower-left corner."),
        S("A golden retriever", "Golden retriever with a pale gold coat and a red nylon collar, standing in profile facing left near the center of the frame, mouth open and tongue out, tail raised mid-wag and the front left paw lifted."),
        S("A yellow umbrella", "Open bright yellow umbrella with eight panels and a curved wooden handle, lying on its side on the ground in the lower-left third, a few water drops beaded on the fabric and the handle pointing toward the center."),
        S("A pale blue convertible", "Pale blue 1960s convertible with a white soft top folded down, chrome bumpers and round headlights, parked parallel to the curb across the lower half of the frame with its front end toward the right edge."),
        S("A wooden fruit cart", "Wooden two-wheeled street cart painted faded green, heaped with oranges in a neat pyramid and a brass hand scale hanging from a hook at the front corner, standing slightly right of center with its handles resting on the ground."),
        S("A grey city pigeon", "Grey city pigeon with iridescent green and purple neck feathers and pink feet, standing on the ground in the lower center of the frame with its head turned sideways, one orange eye facing the camera."),
        S("A black cafe-racer motorcycle", "Black 1970s cafe-racer motorcycle with a tan leather seat, chrome exhaust pipes and a round headlamp, parked on its side stand diagonally across the center of the frame with the front wheel turned toward the viewer."),
        S("A single red balloon", "Single glossy red latex balloon on a thin white string, floating at head height in the upper-right third of the frame, its string tied to the backrest of an empty green metal bench in the lower right."),
        S("A powder-blue delivery van", "Small boxy powder-blue delivery van with rounded fenders, a wooden ladder strapped to the roof rack and its rear doors open, parked slightly left of center with the front end facing the lower-right corner."),
        S("An open guitar case", "Open black hard-shell guitar case lined with red velvet, lying on the ground in the lower center of the frame with a handful of coins and one folded paper note inside, its lid propped upright."),
    ],
    settings={
        "lisbon": T("on a rain-wet cobblestone street in Lisbon at dusk", "Narrow cobblestone street in Lisbon sloping uphill, the stones shiny with rainwater, pastel-tiled facades on both sides with lit shop windows throwing yellow rectangles onto the wet ground, a cloudy violet dusk sky in the top strip of the frame.", [
            "Yellow Lisbon tram stopped further up the hill in the upper-left background, its front headlight on and a few passengers visible as dark shapes behind the windows.",
            "Cast-iron street lamp on the right sidewalk with a glass lantern head, its bulb lit and a small puddle at its base reflecting the yellow light.",
        ]),
        "greek": T("in a whitewashed alley on a Greek island at midday", "Narrow alley of whitewashed houses with blue-painted doors and shutters, stone steps outlined in white paint, hard midday sun from directly above, a sliver of deep blue sky at the top of the frame.", [
            "Magenta bougainvillea vine spilling over a white wall in the upper-right corner, its papery flowers hanging in loose clusters above a blue wooden door.",
            "Row of three terracotta pots holding small green basil plants along the base of the left wall, the middle pot chipped at the rim.",
        ]),
        "montreal": T("on a snowy residential street in Montreal in the morning", "Residential street lined with brick triplexes and exterior iron staircases, fresh snow covering the sidewalks and parked cars, a pale overcast morning sky, soft even light with blue-grey tones.", [
            "Spiral black iron staircase climbing the facade of a red brick building on the left, its steps capped with thin ridges of snow.",
            "Bright orange snow plow parked at the far end of the street in the background, its amber roof beacon switched on.",
        ]),
        "tokyo": T("in a narrow Tokyo back street at night", "Narrow back street in Tokyo at night, two-storey wooden and concrete buildings with cables strung overhead, lit vending machines and small restaurant lanterns throwing white and red patches of light on the asphalt, a dark navy sky.", [
            "Pair of vending machines against a wall on the right, their white front panels lit from inside and filled with rows of colorful drink cans.",
            "Red paper lantern hanging above a small restaurant doorway on the left, a short indigo cloth curtain across the entrance below it.",
        ]),
        "harbor": T("on a harbor quay among fishing boats on an overcast day", "Stone harbor quay with iron mooring bollards and coiled ropes, grey-green water filling the middle distance with small fishing boats at anchor, a flat overcast sky, soft diffuse daylight and muted colors.", [
            "Small wooden fishing boat painted white with a red stripe along the hull, moored beside the quay in the middle ground, a stack of blue plastic crates on its deck.",
            "Herring gull perched on top of an iron bollard at the right edge of the frame, its head turned toward the water.",
        ]),
        "park": T("on a park path covered in autumn leaves", "Paved park path curving into the distance between tall maple trees, the ground covered in fallen orange and red leaves, low late-afternoon sunlight coming from the left through the branches, pale blue sky between the trees.", [
            "Green painted wooden bench with cast-iron armrests along the right side of the path, a few maple leaves lying on its seat.",
            "Old-fashioned black lamp post beside the path on the left, its lamp unlit and a single orange leaf caught at its base.",
        ]),
        "desert": T("at a desert roadside gas station at noon", "Roadside gas station on a two-lane desert highway, a flat roof canopy held up by white columns, a cracked asphalt forecourt, distant red mesas on the horizon, hard noon sun and a cloudless pale blue sky.", [
            "Vintage red gas pump with a round white dial face and a black rubber hose looped over its side, standing under the canopy on the left.",
            "Dry tumbleweed caught against the base of a faded metal sign post at the right edge of the frame, its thin branches tangled with sand.",
        ]),
        "paris": T("on a Parisian boulevard under plane trees", "Wide Parisian boulevard lined with cream limestone buildings and wrought-iron balconies, plane trees dappling the broad sidewalk with midday light, a few pedestrians far down the street, pale blue sky.", [
            "Round dark green advertising column on the sidewalk at the left, its domed top capped with a small finial and its posters faded to pale colors.",
            "Cafe terrace on the right with small round marble tables and woven rattan chairs facing the street, two empty espresso cups on the nearest table.",
        ]),
    },
)

ILLUSTRATION = SceneCategory(
    mediums=[
        "a watercolor children's book illustration",
        "a flat vector illustration with a limited palette",
        "a gouache painting with visible brush strokes",
        "an ink and watercolor storybook illustration",
        "a colored pencil illustration on textured paper",
        "a three-color woodcut-style print",
        "a hand-painted anime background frame",
    ],
    subjects=[
        S("A small red fox wearing a knitted scarf", "Small red fox with a cream chest and black-tipped ears, wearing a long striped green-and-white knitted scarf, sitting upright in the center of the frame with its bushy tail wrapped around its paws and its head tilted to the left."),
        S("A round copper robot", "Round copper robot about the size of a kettle, with two short legs, a single large glass eye lit pale blue, a small antenna topped with a red bead and riveted seams across its body, standing slightly right of center and waving one thin arm."),
        S("A baby dragon with teal scales", "Baby dragon with teal scales, a pale yellow belly, stubby wings folded against its back and two small cream horns, sitting on its haunches in the lower center of the frame and holding a half-eaten red apple in its front claws."),
        S("A hedgehog mail carrier", "Hedgehog mail carrier in a navy-blue cap with a tiny brown leather satchel stuffed with letters, walking upright toward the right edge of the frame, one paw holding a single white envelope sealed with red wax."),
        S("A girl in a yellow raincoat", "Young girl of about eight with light brown skin and two short black braids, wearing a bright yellow raincoat, red rubber boots and a green backpack, walking from left to right across the lower third and looking up with wide eyes."),
        S("An old wizard with a long white beard", "Tall old wizard with pale wrinkled skin and a long white beard tucked into his belt, wearing a pointed indigo hat with silver stars and a patched indigo robe, standing left of center and leaning on a gnarled wooden staff topped with a small crystal."),
        S("A brown bear carrying a lantern", "Large brown bear walking on its hind legs in a short red waistcoat with brass buttons, holding a lit tin lantern out in front with its right paw, positioned in the center of the frame and looking toward the lantern light."),
        S("A small knight in oversized armor", "Small child-sized knight in a dented silver armor suit that is clearly too big, the helmet visor pushed up to show round pink cheeks, holding a wooden sword in both hands and standing with feet apart in the center of the frame."),
        S("A black cat on a flying broom", "Sleek black cat with yellow eyes and a tiny pointed purple hat, riding a straw broom that flies diagonally across the upper half of the frame from left to right, its tail streaming behind and a small brass bell on its collar."),
        S("An owl reading a book", "Tawny owl with round orange eyes and small wire spectacles perched on a stack of three old leather books near the center of the frame, holding an open book in its talons, a feather quill tucked behind one ear tuft."),
        S("A mouse captain on a paper boat", "Folded white paper boat about the length of a hand carrying a small grey mouse captain in a blue sailor collar, the mouse standing at the bow and pointing forward with one paw, the boat centered in the lower half of the frame.", only=("river", "attic")),
        S("A giant snail with a cottage on its shell", "Giant green-grey snail the size of a cart with a tiny timber-framed cottage built on its spiral shell, a red door, two lit round windows and smoke curling from the chimney, moving from right to left across the lower half of the frame."),
    ],
    settings={
        "pines": T("in a moonlit pine forest", "Dense pine forest at night under a full moon, tall dark trunks receding in layers of deep blue and teal, pale moonlight falling in thin stripes across a mossy forest floor scattered with pine cones, a few stars between the branches.", [
            "Cluster of three pale mushrooms with speckled brown caps growing at the base of a pine trunk in the lower-left corner of the frame.",
            "Small brown rabbit peeking out from behind a fallen log at the right edge of the frame, its ears upright and one paw on the log.",
        ]),
        "island": T("on a small floating island above the clouds", "Small grassy island floating in open sky above a sea of white cumulus clouds, roots and rocks dangling from its underside, a clear pale blue sky fading to soft pink near the horizon.", [
            "Tiny windmill with a red roof and four white sails standing at the far edge of the island on the right, its sails turned toward the viewer.",
            "Flock of five white birds flying in a loose V shape across the upper-left corner of the sky, their wings outstretched.",
        ]),
        "attic": T("in a cozy attic library", "Attic room with a slanted wooden ceiling and exposed beams, floor-to-ceiling bookshelves packed with colorful book spines, a round window on the back wall showing a dark evening sky, a single brass floor lamp casting yellow light on a worn red rug.", [
            "Overstuffed green armchair with a folded patchwork blanket over one arm, placed near the round window on the left side of the room.",
            "Tall stack of books on the floor at the lower right, topped with a white teacup on a saucer with a thin curl of steam.",
        ]),
        "cliff": T("on a windy seaside cliff", "Grassy clifftop above a choppy grey-blue sea, wind bending the long grass to the right, white-capped waves breaking against the rocks below, a bright overcast sky with fast-moving clouds.", [
            "Red-and-white striped lighthouse standing on the far headland in the upper-right, its lantern room painted black and its gallery rail white.",
            "Wooden signpost leaning at an angle near the left edge of the cliff, its arrow-shaped board pointing out to sea.",
        ]),
        "market": T("in a busy fantasy market street", "Crowded market street of crooked timber-framed houses with overhanging upper floors, strings of colorful bunting zigzagging overhead, cobblestones underfoot, soft afternoon daylight and a cream-colored sky.", [
            "Market stall with a striped red-and-white awning on the left, its wooden counter piled with round loaves of bread and jars of honey.",
            "Small stone fountain with a fish-shaped spout in the background center, a thin arc of water falling into its round basin.",
        ]),
        "village": T("in a snowy mountain village at dusk", "Snowy mountain village of small wooden chalets with steep roofs heavy with snow, windows lit yellow by lamps inside, pine trees on the slopes behind, a dusk sky graded from violet to pale pink above jagged white peaks.", [
            "Wooden sled with curved runners and a folded red blanket resting in the snow in the lower-left corner of the frame.",
            "Snowman with a carrot nose, coal buttons and a blue knitted hat standing in front of the nearest chalet on the right.",
        ]),
        "meadow": T("in a wildflower meadow on a summer afternoon", "Rolling meadow of tall grass dotted with red poppies, blue cornflowers and white daisies, gentle hills in the distance, a bright sky with a few round white clouds and even afternoon daylight.", [
            "Old wooden fence of three crooked posts and two rails running across the middle ground from the left edge of the frame.",
            "Pair of orange butterflies with black-edged wings fluttering above the flowers in the upper-right third of the frame.",
        ]),
        "river": T("beside a quiet river at sunrise", "Calm river winding between reeds and willow trees, low morning mist hanging over the water, the rising sun just above the far bank tinting the mist pale orange and laying a long orange reflection on the water.", [
            "Small wooden rowing boat tied to a post at the water's edge on the left, a pair of oars resting inside it.",
            "Grey heron standing in shallow water among the reeds at the right edge of the frame, its neck drawn back in an S curve.",
        ]),
    },
)

PEOPLE = SceneCategory(
    mediums=[
        "an editorial portrait photograph",
        "a candid documentary photograph",
        "a natural-light lifestyle photograph",
        "a cinematic film still with a centered composition",
        "a realist oil painting portrait",
        "a 35mm film portrait photograph",
    ],
    subjects=[
        S("A woman in her seventies with silver curls", "Woman in her seventies with light olive skin, short silver curly hair and round tortoiseshell glasses, wearing a mustard knitted cardigan over a white blouse, smiling with closed lips, seated and facing three-quarters left, a thin gold chain at her neck."),
        S("A young man with a shaved head", "Young man in his twenties with deep brown skin and a clean-shaved head, wearing a denim jacket over a plain white T-shirt, calm neutral expression, standing with arms crossed and looking straight at the camera, a small silver hoop in his left ear."),
        S("A teenage girl with long black hair", "Teenage girl with fair skin, freckles across her nose and long straight black hair with a blunt fringe, wearing an oversized forest-green hoodie, laughing with her eyes half closed and one hand raised toward her mouth.", only=("studio", "cafe", "rooftop", "library", "subway", "market")),
        S("A middle-aged chef", "Middle-aged man with tan skin, a trimmed salt-and-pepper beard and dark hair pulled into a short ponytail, wearing a white double-breasted chef jacket with rolled sleeves, focused expression, holding a chef's knife at chest height in his right hand.", only=("studio", "kitchen", "market")),
        S("A woman in a rust-orange headscarf", "Woman in her thirties with medium brown skin wearing a rust-orange headscarf and a loose cream linen shirt, holding a vintage silver film camera at waist height with both hands, gentle smile, head turned slightly to the right."),
        S("An elderly man with a white mustache", "Elderly man with weathered pale pink skin, a bushy white mustache and a grey flat cap, wearing a brown tweed jacket over a blue checked shirt, looking off to the left with a thoughtful expression, both hands resting on a wooden cane."),
        S("A young woman with box braids", "Young woman in her twenties with dark brown skin and long box braids gathered in a high bun, wearing a sleeveless mustard-yellow top and large gold hoop earrings, confident smile showing teeth, shoulders angled left and face toward the camera."),
        S("A boy of about ten with a skateboard", "Boy of about ten with light tan skin and messy sandy-brown hair, wearing a red T-shirt, khaki shorts and scuffed white sneakers, holding a worn blue skateboard under his right arm and grinning with a gap between his front teeth.", only=("studio", "rooftop", "market", "subway", "kitchen")),
        S("A nurse in navy scrubs", "Woman in her forties with East Asian features, light skin and a short black bob, wearing navy-blue scrubs with a stethoscope around her neck and a small ID badge clipped at the chest, kind tired smile, standing straight and facing the camera.", only=("studio", "cafe", "subway", "rooftop")),
        S("A bearded man in a red beanie", "Man in his thirties with fair skin and a thick auburn beard, wearing a red knit beanie, a grey waffle-knit henley and a brown canvas work jacket, relaxed half smile, leaning his right shoulder forward and looking slightly past the camera."),
        S("A ballet dancer en pointe", "Female ballet dancer in her twenties with light brown skin and black hair in a tight bun, wearing a white leotard and pale pink tights, balancing en pointe on her left foot with her right leg extended behind her and arms raised in an arc.", only=("studio", "rooftop", "subway", "library"), extras=False),
        S("A man in a charcoal suit", "Man in his fifties with dark brown skin, closely cropped grey hair and thin black-rimmed glasses, wearing a charcoal-grey suit, a white shirt and a burgundy tie, friendly closed-mouth smile, facing the camera with his hands in his trouser pockets."),
    ],
    settings={
        "studio": T("against a plain studio backdrop", "Plain mid-grey seamless paper studio backdrop filling the frame, soft even light from a large window-like source on the left, neutral white balance and no props."),
        "cafe": T("at a window seat in a small cafe", "Small cafe interior with a large street-facing window behind the subject, pale grey daylight coming through the glass, a wooden counter and shelves of mugs out of focus in the background, muted brown and cream tones.", [
            "White ceramic cup of cappuccino with a leaf pattern in the foam, resting on the wooden table in the lower-right corner of the frame.",
            "Open paperback book lying face down on the table in the lower-left corner, its cover a faded blue with a creased spine.",
        ]),
        "workshop": T("in a woodworking workshop", "Woodworking workshop with pegboard walls hung with hand saws and clamps, sawdust on the concrete floor, a tall dusty window on the right letting in pale daylight, a long workbench behind the subject.", [
            "Half-finished wooden chair frame standing on the workbench behind the subject's left shoulder, its joints held by two orange clamps.",
            "Hand plane and a few curled wood shavings lying on the edge of the workbench in the lower-right corner of the frame.",
        ]),
        "rooftop": T("on a city rooftop at sunset", "Flat city rooftop with a low brick parapet, water towers and apartment buildings in the background, the setting sun low on the right lighting the scene orange, a clear sky fading from orange to pale blue.", [
            "String of small round bulbs hanging across the upper part of the frame between two black metal poles, the bulbs unlit.",
            "Potted olive tree in a large terracotta planter standing near the parapet on the left side of the frame.",
        ]),
        "library": T("in a quiet public library", "Quiet public library with long rows of wooden bookshelves receding behind the subject, tall arched windows letting in soft daylight, reading tables with green-shaded lamps, a muted brown and green palette.", [
            "Green-shaded brass banker's lamp switched on at the edge of a reading table in the lower-left corner of the frame.",
            "Neat stack of three hardcover books with red and navy spines on the reading table in the lower-right corner.",
        ]),
        "kitchen": T("in a sunlit home kitchen", "Bright home kitchen with white subway-tile walls, open wooden shelves holding jars and plates, a window over the sink on the left letting in morning sunlight, a pale oak countertop running across the lower frame.", [
            "Wooden cutting board with half a lemon and a small pile of chopped parsley on the counter in the lower-right corner of the frame.",
            "Glass jar of dried pasta and a ceramic crock of wooden spoons on the open shelf behind the subject.",
        ]),
        "subway": T("inside a subway car", "Interior of a nearly empty subway car with orange plastic seats, steel grab poles and rounded windows showing a dark tunnel, flat white fluorescent light from the ceiling, plain grey panels above the windows.", [
            "Vertical stainless steel grab pole running from floor to ceiling just left of the subject, a small scuff mark at hand height.",
            "Folded newspaper left on the orange seat in the lower-right corner of the frame, its pages slightly curled.",
        ]),
        "market": T("at an outdoor farmers market", "Outdoor farmers market on a paved square with canvas-topped stalls of fruit and vegetables out of focus behind the subject, overcast daylight giving soft even light, green and red produce colors in the background.", [
            "Wooden crate of red tomatoes on a stall table at the lower-left edge of the frame, a few tomatoes still on the vine.",
            "Bunch of dried red chili peppers tied with twine and hanging from a stall pole in the upper-right corner of the frame.",
        ]),
    },
)

PRODUCT = SceneCategory(
    mediums=[
        "a commercial studio product photograph",
        "an e-commerce product photograph with a centered composition",
        "a photorealistic 3D product render",
        "a lifestyle product photograph",
        "a catalog product photograph shot at eye level",
    ],
    subjects=[
        S("A pair of matte black over-ear headphones", "Pair of matte black over-ear wireless headphones with cushioned grey ear cups, a brushed aluminum slider on each side and a padded headband, standing upright at the center of the frame with the cups angled slightly toward the viewer."),
        S("A square glass perfume bottle", "Square clear glass perfume bottle with thick beveled walls, filled two-thirds with pale amber liquid and topped with a heavy faceted black cap, standing at the center of the frame with a small highlight along its left edge."),
        S("A white leather sneaker", "Single low-top white leather sneaker with a gum rubber sole, tonal white laces and a small forest-green suede heel tab, placed in three-quarter view at the center of the frame with the toe pointing toward the lower-left corner."),
        S("A steel dive watch", "Stainless steel dive watch with a black dial, white lume-filled hour markers, a rotating black ceramic bezel and a brushed steel bracelet, lying face up at a slight angle in the center of the frame, the crown pointing to the right."),
        S("A speckled ceramic mug", "Handmade ceramic mug with a speckled oatmeal glaze, a thick rounded handle and an unglazed terracotta band at the base, standing in the center of the frame with the handle turned to the right and a thin trace of steam above the rim."),
        S("An amber dropper bottle of face serum", "Small amber glass dropper bottle of face serum with a black rubber bulb and a plain white band, standing upright slightly left of center, its glass pipette resting beside it with a single clear drop at the tip."),
        S("A compact mechanical keyboard", "Compact mechanical keyboard with a cream aluminum case, cream and sage-green keycaps and a single orange escape key, lying flat and angled diagonally across the center of the frame, a coiled cream cable curling out from its top edge.", only=("backdrop", "terrazzo", "desk", "gradient")),
        S("A waxed canvas rolltop backpack", "Olive-green waxed canvas rolltop backpack with tan leather straps, brass buckles and a zippered front pocket, standing upright at the center of the frame with the top rolled down twice and the shoulder straps turned slightly toward the viewer.", only=("backdrop", "terrazzo", "desk", "sand", "gradient")),
        S("A coral fabric speaker", "Cylindrical portable speaker wrapped in coral-red woven fabric, with a rubber top panel holding four round grey buttons and a short black carrying loop, standing upright in the center of the frame."),
        S("A pair of tortoiseshell sunglasses", "Pair of round tortoiseshell acetate sunglasses with dark green lenses and gold metal hinges, folded and resting at a slight angle in the center of the frame, the left lens catching a small white highlight."),
        S("A black fountain pen", "Black resin fountain pen with a two-tone gold nib, a gold clip and a thin gold ring at the cap, lying diagonally across the center of the frame with the cap posted and the nib pointing toward the lower-left corner."),
        S("A compact espresso machine", "Compact brushed stainless steel espresso machine with a single group head, a black portafilter with a wooden handle, a round pressure gauge on the front and a small steam wand on the right side, facing the viewer in the center of the frame.", only=("backdrop", "terrazzo", "desk", "marble")),
    ],
    settings={
        "backdrop": T("on a seamless pastel backdrop", "Seamless pastel peach paper backdrop curving from the floor into the wall with no visible horizon, soft even light from a large overhead softbox, clean and uncluttered."),
        "marble": T("on a wet black marble slab", "Slab of polished black marble with fine white veins covering the lower frame and scattered with tiny water droplets, a dark charcoal background, a single strip light from above leaving a narrow highlight across the stone.", [
            "Sprig of fresh rosemary lying on the marble at the lower-left corner of the frame, a few droplets on its needles.",
            "Three small smooth grey river pebbles stacked on top of each other at the right edge of the marble slab.",
        ]),
        "terrazzo": T("on a terrazzo pedestal", "Low cylindrical terrazzo pedestal with a cream base and flecks of terracotta, grey and green, placed against a sage-green plaster wall with a subtle trowel texture, soft even daylight from the left.", [
            "Dried palm leaf in a pale beige tone leaning against the wall behind the pedestal on the right side of the frame.",
            "Small stack of two square travertine blocks beside the pedestal at the lower left, their pitted surfaces facing the viewer.",
        ]),
        "desk": T("on a wooden desk by a window", "Light oak desk surface filling the lower half of the frame, a bright window on the left with sheer white curtains diffusing the daylight, an off-white wall behind, clean Scandinavian interior tones.", [
            "Small potted succulent in a white concrete pot standing at the upper-right corner of the desk, its leaves a pale blue-green.",
            "Closed linen-bound notebook in sage green lying at the lower-left corner of the desk with a pencil on top.",
        ]),
        "sand": T("on rippled sand with palm shadows", "Smooth beige sand with fine wind ripples covering the frame, the sharp shadows of palm fronds falling diagonally across it, bright midday sunlight from the upper right, a hint of turquoise water along the top edge.", [
            "Half-buried pale pink scallop shell in the sand at the lower-right corner of the frame, its ridged edge facing up.",
            "Single dried orange starfish lying on the sand near the upper-left corner of the frame, one arm slightly curled.",
        ]),
        "gradient": T("floating against a gradient background", "Smooth gradient background from deep cobalt blue at the top to pale lilac at the bottom, no floor and no horizon, even soft studio light from the front.", [
            "Three small clear glass spheres floating at different heights around the product, the largest one in the upper-right corner of the frame.",
        ]),
        "stone": T("on a stone in shallow water", "Flat grey stone surrounded by still shallow water with small concentric ripples, smooth pebbles visible under the surface, a pale misty grey background and diffuse overcast light.", [
            "Bright green monstera leaf partly submerged in the water at the lower-left corner of the frame, a few droplets on its surface.",
            "Small cluster of pale moss-covered pebbles at the right edge of the stone, half in and half out of the water.",
        ]),
    },
)

SCENE = SceneCategory(
    mediums=[
        "a cinematic matte painting",
        "a photorealistic 3D render",
        "a concept art painting",
        "a wide cinematic photograph",
        "a hand-painted anime background",
        "a detailed pixel art scene",
    ],
    subjects=[
        S("A steam locomotive", "Black steam locomotive with red wheels and a brass-trimmed boiler pulling three dark green passenger carriages, a plume of white steam rising from its chimney, crossing the frame from left to right in the middle ground.", only=("alpine", "canyon", "tundra")),
        S("A patched airship", "Large cigar-shaped airship with a patched canvas envelope in faded cream and rust, a long wooden gondola slung underneath with round portholes and two propellers at the rear, floating in the upper half of the frame and heading right.", only=("alpine", "neon", "canyon", "tundra", "rainforest", "harbor", "coast")),
        S("A red-and-white camper van", "Boxy 1970s camper van painted red and white with a pop-up roof and a spare wheel on the front, parked in the left third of the frame with its side door slid open and a folding chair beside it.", only=("alpine", "canyon", "tundra")),
        S("A striped hot air balloon", "Hot air balloon with vertical stripes of red, yellow and blue and a wicker basket hanging beneath it with two small figures inside, drifting in the upper-right third of the frame with a short orange flame visible above the basket.", only=("alpine", "canyon", "tundra", "rainforest", "harbor")),
        S("A domed research outpost", "Cluster of three white geodesic domes linked by short tubular corridors, small square windows lit from inside, a tall radio antenna and a blue solar panel array beside them, sitting in the center of the frame.", only=("mars", "tundra", "canyon")),
        S("A container ship", "Large cargo ship with a dark blue hull and a red waterline, stacked high with multicolored shipping containers and a white bridge tower at the stern, moving from right to left across the middle third of the frame with a white wake behind it.", only=("coast", "harbor")),
        S("A giant tortoise carrying a village", "Colossal tortoise with a mossy domed shell carrying a small village of stone houses, terraced gardens and a tiny bell tower on its back, walking slowly toward the viewer in the center of the frame, each leg as wide as a tree trunk.", only=("alpine", "canyon", "tundra", "rainforest")),
        S("A vintage tram", "Single-car vintage tram painted cream and green with wooden window frames and a trolley pole touching the overhead wires, stopped near the center of the frame with its front headlight lit and its doors folded open.", only=("neon", "harbor")),
        S("A weathered yellow biplane", "Weathered yellow biplane with two fabric-covered wings, a wooden propeller with one broken blade and a faded red roundel on the fuselage, resting tilted on its left wheel in the lower center of the frame, tall grass growing around its tail.", only=("alpine", "canyon", "tundra")),
        S("A three-masted sailing ship", "Three-masted wooden sailing ship with patched cream sails fully set, a dark brown hull with a single yellow stripe and a carved figurehead at the bow, sailing diagonally toward the lower left across the middle of the frame.", only=("coast", "harbor")),
        S("A giant walking robot", "Towering two-legged robot the height of a ten-storey building, with a rust-orange armored body, a small cockpit window in its chest and long hydraulic legs, mid-stride in the center of the frame with one foot lifted off the ground.", only=("neon", "canyon", "tundra", "alpine", "mars")),
        S("A roadside noodle stall", "Small roadside noodle stall with a red plastic awning, a steaming stainless steel pot on a gas burner and four blue plastic stools around a folding table, set up in the right third of the frame under a single bare bulb.", only=("neon", "harbor")),
    ],
    settings={
        "alpine": T("in an alpine valley at dawn", "Green alpine valley with a winding river, steep grey mountain walls capped with snow on both sides, a small pine forest in the middle distance, the first pale pink dawn light touching the highest peaks under a clear sky.", [
            "Small wooden hay barn with a dark shingled roof standing on the valley floor in the lower-left corner of the frame.",
            "Flock of white sheep grazing in a loose cluster on the grassy slope at the right edge of the frame.",
        ]),
        "neon": T("in a rainy neon-lit city at night", "Dense futuristic city street at night with tall buildings covered in pink, cyan and violet neon signs made of abstract shapes, heavy rain falling, the wet asphalt reflecting the colored lights, thin haze between the towers.", [
            "Group of pedestrians holding transparent umbrellas crossing the street in the middle distance, their coats dark against the neon.",
            "Small hovering delivery drone with two rotors and a blinking green light in the upper-left third of the frame.",
        ]),
        "canyon": T("in a red desert canyon at sunset", "Wide desert canyon of layered red and orange sandstone cliffs, a dry sandy riverbed winding across the floor, the setting sun low on the horizon at the left casting long shadows, a clear sky graded from orange to deep blue.", [
            "Tall saguaro cactus with two raised arms standing on a rock ledge at the right edge of the frame.",
            "Single hawk with outstretched wings circling high in the sky in the upper-right corner of the frame.",
        ]),
        "tundra": T("on a frozen tundra under the aurora", "Flat snow-covered tundra stretching to a low line of dark hills, a night sky full of stars with curtains of green and violet aurora rippling across the upper half, faint green reflections on the snow.", [
            "Cluster of three orange tents pitched close together on the snow in the lower-left corner, one lit from inside by a lantern.",
            "Arctic fox with a thick white coat trotting across the snow in the lower-right corner of the frame.",
        ]),
        "rainforest": T("above a misty rainforest river", "Wide brown river flowing through dense tropical rainforest, huge trees with buttress roots and hanging vines lining both banks, low white mist drifting over the water, soft diffuse light from a pale grey sky.", [
            "Flock of scarlet macaws flying across the upper-left corner of the frame above the treetops.",
            "Long wooden dugout canoe pulled up on a muddy bank in the lower-right corner of the frame.",
        ]),
        "mars": T("on a dusty Martian plain", "Rust-red Martian plain strewn with dark rocks and gentle dunes, a hazy butterscotch-colored sky, a small pale sun low near the horizon and distant crater rims along the skyline.", [
            "Six-wheeled exploration rover with a tall camera mast parked on a low rise at the left side of the frame.",
            "Line of boot prints crossing the dusty ground in the foreground from the lower-left corner toward the center.",
        ]),
        "coast": T("off a rocky coast in a storm", "Rocky coastline battered by a storm, tall dark grey waves breaking into white spray against black cliffs, a heavy slate-grey sky with low torn clouds, flat cold light and rain streaking diagonally.", [
            "Small white lighthouse on the farthest cliff in the upper-left of the frame, its lamp lit against the dark sky.",
            "Three white seabirds struggling against the wind in the middle of the sky, their wings bent.",
        ]),
        "harbor": T("in an old harbor town at dusk", "Old harbor town of tall narrow houses painted ochre, teal and brick red along a stone quay, calm water in the foreground reflecting lit windows, strings of lamps along the promenade and a deep blue dusk sky.", [
            "Row of small wooden rowing boats moored along the quay in the lower-left corner of the frame.",
            "Stone clock tower rising above the rooftops in the center background, its clock face lit.",
        ]),
    },
)

ABSTRACT = SceneCategory(
    mediums=[
        "a minimalist 3D render",
        "an abstract oil painting on canvas",
        "a two-ink risograph print",
        "a Bauhaus-inspired geometric composition",
        "a layered paper-cut collage",
        "a generative digital artwork",
    ],
    subjects=[
        S("Three interlocking glass rings", "Three large interlocking rings of clear glass with thick rounded edges, tilted at different angles and linked at the center of the frame, each ring tinted a faint shade of blue, green or pink where they overlap."),
        S("A single folded ribbon of paper", "Single long ribbon of cream paper folding and twisting in loose loops from the lower-left corner to the upper-right corner, its edges crisp and the inner side of each fold a slightly darker cream."),
        S("A grid of terracotta spheres", "Grid of seven by five small matte spheres in even rows filling the middle of the frame, all the same size, every sphere terracotta except one cobalt-blue sphere placed off-center in the fourth row."),
        S("A fractured marble cube", "Large cube of white marble with grey veins split cleanly into four irregular fragments that hover slightly apart from each other at the center of the frame, the inner faces rough and pale."),
        S("A spiral of red thread", "Single continuous red thread coiling inward in a flat spiral of about twelve turns at the center of the frame, the spacing between turns slightly uneven, the loose end trailing off toward the lower-right corner."),
        S("Five overlapping translucent circles", "Five large overlapping translucent circles in cyan, magenta, yellow, orange and violet arranged in a loose diagonal from upper left to lower right, their overlapping areas mixing into darker tints."),
        S("An endless looping staircase", "Endless looping staircase of smooth pale-grey concrete steps forming a closed square circuit that appears to climb continuously, floating at the center of the frame with no supports and no railings."),
        S("A wave built from stacked lines", "Wave shape built from about forty thin parallel horizontal black lines stacked vertically, each line bending upward in the middle so that together they form one smooth rolling crest across the center of the frame."),
        S("A balanced stack of geometric solids", "Vertical stack of geometric solids balanced on one another at the center of the frame, a mustard cylinder at the base, a coral cone on its side, a navy cube tipped onto one corner and a small white sphere on top."),
        S("A scattering of chrome droplets", "Dozens of small liquid-chrome droplets of different sizes scattered across the middle band of the frame, each a smooth reflective bead mirroring the surrounding color, the largest droplet slightly right of center."),
        S("Two strips of torn paper", "Horizontal strip of torn ochre paper crossing the frame just below the center, its upper edge rough and fibrous, laid over a second torn strip of deep blue paper that peeks out beneath it along the whole width."),
        S("An hourglass of falling squares", "Tall hourglass outline drawn with a single thin white line, filled with tiny colored squares that fall through its narrow waist and collect in a sloped pile at the bottom, centered vertically in the frame."),
    ],
    settings={
        "ultramarine": T("on a deep ultramarine field", "Flat deep ultramarine background filling the entire frame with a very fine uniform grain, no horizon and no depth."),
        "sand": T("on a pale sand-colored field", "Pale sand-colored background with a subtle mottled texture like handmade paper, evenly lit and filling the whole frame.", [
            "Thin black horizontal line running across the lower quarter of the frame from edge to edge, perfectly straight and even.",
        ]),
        "peach": T("against a peach-to-lilac gradient", "Smooth vertical gradient from soft peach at the bottom to pale lilac at the top, no texture and no visible horizon.", [
            "Small solid black circle placed in the upper-right corner of the frame like a distant sun, its edge perfectly crisp.",
        ]),
        "charcoal": T("on a charcoal background", "Matte charcoal-black background filling the frame with a faint darkening toward the corners, no floor and no horizon.", [
            "Scattering of tiny white dots across the upper third of the frame like specks of dust, all of similar size.",
        ]),
        "grid": T("on an off-white grid paper field", "Off-white background printed with a faint pale-blue square grid like engineering paper, evenly lit and filling the entire frame."),
        "split": T("on a split field of olive and coral", "Background split vertically down the middle into two flat fields, olive green on the left and muted coral on the right, the dividing line perfectly straight."),
        "mint": T("on a mint-green field", "Flat pale mint-green background with a soft paper texture, filling the whole frame without any gradient.", [
            "Thin coral arc drawn in the lower-left corner of the frame like a quarter of a large circle, with a uniform line weight.",
        ]),
    },
)

_EXTERIOR = ("bluehour", "snow", "summer", "fog", "rain")
_INTERIOR = ("morning", "evening", "overcast", "sunbeams")

ARCHITECTURE = SceneCategory(
    mediums=[
        "an architectural photograph with straight verticals",
        "a photorealistic architectural visualization",
        "a 35mm film photograph",
        "an editorial architecture magazine photograph",
        "a watercolor architectural sketch",
    ],
    subjects=[
        S("A brutalist concrete library", "Brutalist public library of board-marked grey concrete with deep horizontal window bands, a cantilevered upper floor overhanging the entrance and a broad flight of concrete steps leading to glass doors, occupying the center of the frame.", only=_EXTERIOR),
        S("A timber A-frame cabin", "Small A-frame cabin clad in dark-stained cedar boards with a steep black metal roof reaching to the ground, a fully glazed triangular front facade and a narrow wooden deck, sitting slightly left of center.", only=_EXTERIOR),
        S("A glass pavilion", "Single-storey glass pavilion with floor-to-ceiling glass walls, thin white steel columns and a flat white roof slab overhanging on all sides, a sparse modern interior visible through the glass, placed in the center of the frame.", only=_EXTERIOR),
        S("An Art Deco cinema", "Art Deco cinema facade in cream stucco with stepped vertical fins, a tall central tower above a curved canopy lined with rows of small round bulbs, mint-green trim and a blank marquee board, filling the center of the frame.", only=_EXTERIOR),
        S("A whitewashed adobe house", "Two-storey adobe house with rounded whitewashed walls, small deep-set windows with blue wooden frames, protruding wooden roof beams and an outdoor staircase leading to a flat roof terrace, standing in the center of the frame.", only=_EXTERIOR),
        S("A modern cantilevered villa", "Modern two-storey villa with a smooth white rendered lower volume and a dark timber-clad upper volume cantilevering several meters over a terrace, long horizontal windows and a flat roof, occupying the middle of the frame.", only=_EXTERIOR),
        S("A Japanese wooden tea house", "Small Japanese tea house with dark timber posts, white plaster walls, sliding paper shoji screens and a low thatched roof with deep eaves, a narrow stone path leading to its raised veranda, positioned right of center.", only=_EXTERIOR),
        S("A Scandinavian kitchen", "Minimal Scandinavian kitchen with pale ash cabinetry, a long white quartz island with three black pendant lamps above it, matte black tap and handles, and open shelves holding white ceramics, seen from the end of the island.", only=_INTERIOR),
        S("A white spiral staircase", "Sculptural spiral staircase of white painted steel with oak treads and a continuous curved white balustrade, winding upward through a double-height space, centered in the frame and seen from slightly below.", only=_INTERIOR, extras=False),
        S("A minimalist bathroom", "Minimalist bathroom with a freestanding white stone bathtub, pale grey microcement walls, a round mirror with a thin brass frame above a floating oak vanity and a tall frosted-glass window, seen from the doorway.", only=_INTERIOR),
        S("A mid-century living room", "Mid-century modern living room with a long low walnut sideboard, a tan leather lounge chair with ottoman, a mustard wool sofa and a round white globe pendant lamp, arranged around a rectangular cream wool rug.", only=_INTERIOR),
        S("A concrete reading nook", "Built-in reading nook set into a board-marked concrete wall and lined with pale oak slats, a deep bench with a grey wool cushion and a narrow horizontal window above it, filling the center of the frame.", only=_INTERIOR),
    ],
    settings={
        "bluehour": T("at blue hour with its lights on", "Deep blue evening sky just after sunset, the building's interior lights switched on and spilling yellow light through the windows onto the ground in front, a few bare trees at the edges of the frame.", [
            "Black bicycle leaning against a slim post near the entrance, its front wheel turned toward the building.",
        ]),
        "snow": T("under an overcast winter sky with light snow", "Flat white overcast winter sky, light snow falling, a thin layer of snow on the ground and on bare shrubs around the building, soft shadowless light and muted grey tones.", [
            "Single line of footprints in the fresh snow leading to the entrance from the lower-left corner of the frame.",
        ]),
        "summer": T("in hard midday summer sun", "Cloudless deep blue summer sky, hard midday sun from high above leaving crisp shadows under eaves and overhangs, dry grass and pale gravel around the building.", [
            "Tall slender cypress tree standing at the right edge of the frame, its dark green column reaching above the roofline.",
        ]),
        "fog": T("in early morning fog", "Dense early morning fog softening everything beyond the building into pale grey, dew on the grass in the foreground, diffuse silvery light and muted green and grey tones.", [
            "Low dry-stone wall of grey fieldstones running across the foreground from the left edge of the frame.",
        ]),
        "rain": T("after rain at sunset", "Wet ground after a rain shower with shallow puddles reflecting the building, the setting sun breaking through clearing clouds on the right and tinting their undersides orange, the air washed clear.", [
            "Person in a dark coat with a black umbrella walking past at the left edge, small in the frame.",
        ]),
        "morning": T("in soft morning daylight", "Soft morning daylight entering through tall windows on the left and falling in pale patches across a polished concrete floor, white walls, neutral white balance and a calm airy atmosphere.", [
            "Tall potted fiddle-leaf fig in a woven seagrass basket standing in the left corner of the room.",
        ]),
        "evening": T("in the evening with the lamps on", "Evening interior with dark blue dusk visible through the windows, the room lit by its own lamps leaving small pools of yellow light on the floor and walls, dim corners.", [
            "Open book and a pair of reading glasses lying on a low side table in the foreground at the lower right.",
        ]),
        "overcast": T("on an overcast afternoon", "Flat overcast afternoon light coming through large windows, even shadowless illumination, a muted grey-green garden visible outside and neutral color balance.", [
            "Folded grey wool throw draped over the arm of a chair at the right edge of the frame.",
        ]),
        "sunbeams": T("with sharp sunbeams through high windows", "Bright sunbeams entering through high windows on the right and drawing sharp diagonal bars of light across the floor and walls, fine dust visible in the beams and the rest of the room in soft shade.", [
            "Ceramic vase with three dried pampas grass stems standing on the floor in the lower-left corner of the frame.",
        ]),
    },
)

_SAVORY_ASIAN = ("wood", "marble", "slate", "pastel", "terrace")

FOOD = SceneCategory(
    mediums=[
        "an overhead food photograph",
        "a close-up food photograph shot at a low angle",
        "an editorial cookbook photograph",
        "a rustic natural-light food photograph",
        "a bright minimalist food photograph",
    ],
    subjects=[
        S("A bowl of tonkotsu ramen", "Deep black ceramic bowl of tonkotsu ramen with cloudy pale broth, wavy noodles, two slices of chashu pork, a halved soft-boiled egg with a jammy orange yolk, a sheet of nori and sliced green onions, placed in the center.", only=_SAVORY_ASIAN),
        S("A stack of blueberry pancakes", "Stack of four fluffy light-brown pancakes on a white plate, topped with fresh blueberries and a square pat of butter melting at the top, maple syrup dripping down the sides, centered slightly left.", only=("wood", "marble", "pastel", "terrace", "picnic")),
        S("A margherita pizza", "Round Neapolitan margherita pizza with a puffy blistered crust, bright red tomato sauce, torn patches of melted mozzarella and a few whole basil leaves, resting on a wooden peel in the center of the frame.", only=("wood", "slate", "trattoria", "picnic", "marble")),
        S("A slice of chocolate layer cake", "Tall slice of three-layer chocolate cake with dark ganache frosting and thin cream filling between the layers, a single raspberry on top, standing upright on a small pale pink plate with a silver fork beside it."),
        S("A poke bowl", "Shallow white bowl of poke with cubes of raw red tuna, sliced avocado, edamame, shredded red cabbage, cucumber ribbons and white rice, sprinkled with sesame seeds and a drizzle of spicy mayo, placed in the center.", only=_SAVORY_ASIAN + ("picnic",)),
        S("A plate of chicken tacos", "Three soft corn tortilla tacos lined up on an oval blue enamel plate, filled with grilled chicken, diced white onion, chopped cilantro and a spoonful of red salsa, two lime wedges at the end of the plate.", only=("wood", "slate", "pastel", "terrace", "picnic")),
        S("A flaky croissant", "Large flaky croissant with a shiny deep brown crust and clearly layered ridges, resting on a small square of parchment paper in the center of the frame, a few flakes of pastry scattered around it.", only=("wood", "marble", "pastel", "terrace", "picnic")),
        S("A bowl of Thai green curry", "Round ceramic bowl of Thai green curry with chunks of chicken, round green eggplants, sliced red chili and Thai basil leaves in a pale green coconut sauce, a small mound of jasmine rice at the side of the bowl.", only=_SAVORY_ASIAN),
        S("A glass of iced matcha latte", "Tall clear glass of iced matcha latte with a layer of white milk at the bottom and bright green matcha on top, a few ice cubes and a paper straw, standing slightly right of center with condensation on the glass.", only=("wood", "marble", "pastel", "terrace", "picnic")),
        S("A sushi platter", "Rectangular slate platter holding eight pieces of nigiri with salmon, tuna and yellowtail and six maki rolls, a small mound of pickled ginger and a dab of wasabi at one end, placed diagonally across the frame.", only=("wood", "marble", "pastel", "terrace")),
        S("A loaf of sourdough bread", "Round loaf of sourdough bread with a deep brown crackled crust and a single curved ear from the score, one slice cut to show the open airy crumb, resting on a floured wooden board in the center."),
        S("A pan of shakshuka", "Black cast-iron pan of shakshuka with three eggs poached in a thick red tomato and pepper sauce, sprinkled with crumbled feta and chopped parsley, a wooden spoon resting on the rim, placed in the center of the frame.", only=("wood", "slate", "marble", "trattoria", "terrace")),
    ],
    settings={
        "wood": T("on a rustic wooden table", "Rustic dark walnut table with visible grain and small knots filling the frame, soft daylight from a window on the left, muted brown and cream tones.", [
            "Crumpled oatmeal linen napkin lying loosely at the upper-left corner of the table, one corner folded over.",
            "Small ceramic dish of flaky sea salt at the right edge of the frame with a tiny wooden spoon in it.",
        ]),
        "marble": T("on a white marble countertop", "White Carrara marble countertop with soft grey veins, a pale grey tiled wall behind, bright even daylight from above, clean and fresh.", [
            "Small bunch of fresh herbs tied with twine lying at the lower-left corner of the countertop.",
            "Pair of brass forks laid side by side at the right edge of the frame, their tines pointing up.",
        ]),
        "slate": T("on a dark slate surface", "Dark charcoal slate surface with a fine rough texture filling the frame, a single soft light from the upper left and deep shadows toward the edges.", [
            "Scattered crushed black peppercorns near the lower-right corner of the slate, a few whole ones among them.",
            "Dark grey linen napkin folded loosely along the upper edge of the frame.",
        ]),
        "terrace": T("on a sunny cafe terrace table", "Round white metal cafe table on a sunny terrace, bright morning sun from the right leaving crisp shadows across the tabletop, green hedges and a striped awning out of focus in the background.", [
            "Small glass carafe of water with two short glasses standing at the upper-right edge of the table.",
            "Folded newspaper lying at the left edge of the table, its printed columns too small to read.",
        ]),
        "pastel": T("on a pastel blue tabletop", "Flat pastel blue painted tabletop filling the frame, bright even light from above, clean modern styling with minimal props.", [
            "Small pale pink ceramic cup of water standing at the upper-left corner of the tabletop.",
        ]),
        "trattoria": T("on a checked tablecloth in a trattoria", "Red-and-white checked cotton tablecloth covering a table in a small trattoria, a whitewashed stone wall with a lit wall sconce in the background, the sconce giving off yellow light.", [
            "Straw-wrapped bottle of red wine standing at the upper-left of the table next to a short water glass.",
            "Small glass dish of olive oil with a sprig of rosemary at the right edge of the frame.",
        ]),
        "picnic": T("on a picnic blanket in the park", "Blue-and-white striped cotton picnic blanket spread over green grass, dappled afternoon sunlight through tree leaves overhead, a few blades of grass poking up at the edges.", [
            "Wicker picnic basket with its lid half open at the upper-right corner of the blanket, a folded cloth inside.",
            "Glass bottle of lemonade with a paper straw lying on its side at the lower-left corner of the blanket.",
        ]),
    },
)

NATURE = SceneCategory(
    mediums=[
        "a telephoto wildlife photograph",
        "a wide-angle nature photograph",
        "a documentary nature photograph",
        "a naturalist watercolor painting",
        "a 35mm film photograph",
    ],
    subjects=[
        S("A red fox", "Red fox with a thick orange coat, a white chest and black legs, pausing mid-stride in the lower center of the frame with its head turned toward the viewer, ears pricked and one front paw raised.", only=("rainforest", "meadow", "snow", "river", "prairie")),
        S("A snow leopard", "Snow leopard with a pale grey coat covered in dark rosettes and a long thick tail, crouched on a rocky ledge in the right third of the frame, pale green eyes fixed on something below.", only=("mountain", "snow")),
        S("A great blue heron", "Great blue heron with blue-grey plumage, a long yellow bill and a black stripe above the eye, standing on one leg in shallow water slightly left of center, its neck drawn into an S curve.", only=("wetland", "river")),
        S("A green sea turtle", "Green sea turtle with a mottled olive-brown shell and scaly flippers, gliding diagonally from the lower left toward the upper right across the center of the frame, one front flipper extended forward.", only=("reef", "kelp", "lagoon")),
        S("A plains zebra", "Plains zebra with bold black-and-white stripes and a short upright mane, standing broadside and facing left in the center of the frame, its head slightly lowered and ears turned toward the viewer.", only=("savanna", "waterhole")),
        S("A giant sequoia", "Single enormous giant sequoia with a deeply furrowed cinnamon-red trunk rising out of the top of the frame, its base wider than a car, standing in the center with ferns around its roots.", only=("rainforest", "snow")),
        S("A bighorn ram", "Bighorn ram with a light brown coat, a white rump patch and thick curled horns spiraling past its cheeks, standing on a rock outcrop in the left third of the frame and looking straight at the viewer.", only=("mountain", "desert", "canyon")),
        S("A common kingfisher", "Common kingfisher with a bright orange breast and an electric-blue back, perched on a thin mossy branch in the right third of the frame, a small silver fish held crosswise in its long black bill.", only=("river", "wetland")),
        S("A monarch butterfly on a thistle", "Monarch butterfly with orange wings veined in black and edged with white dots, resting with its wings open on the purple flower head of a thistle in the center of the frame.", only=("meadow", "prairie")),
        S("A clownfish in an anemone", "Orange clownfish with three white bands edged in black, hovering at the front of a pale green sea anemone whose soft tentacles sway around it, positioned slightly right of center.", only=("reef", "lagoon")),
        S("A bull moose", "Bull moose with a dark brown coat, a long drooping muzzle and wide flat antlers, standing knee-deep in water in the center of the frame, water dripping from its chin.", only=("wetland", "river", "snow")),
        S("A flowering saguaro cactus", "Tall saguaro cactus with three upward-curving arms and pleated green skin lined with pale spines, a crown of creamy white flowers at the top of each arm, standing in the center of the frame.", only=("desert", "canyon")),
        S("An emperor penguin", "Adult emperor penguin with a black head, yellow-orange ear patches and a pale yellow chest, standing upright slightly left of center and looking to the right, a thin dusting of snow on its back.", only=("snow", "ice")),
    ],
    settings={
        "rainforest": T("in a temperate rainforest", "Old-growth temperate rainforest with moss-covered trunks and ferns carpeting the floor, a thin haze hanging between the trees, soft diffuse daylight filtering down through the canopy in pale green tones.", [
            "Fallen log covered in thick green moss and small orange fungi running across the lower-left corner of the frame.",
        ]),
        "meadow": T("in an alpine meadow in summer", "High alpine meadow of short grass and yellow and purple wildflowers, a snow-capped mountain range on the horizon, a clear blue sky with a few small white clouds and bright morning light.", [
            "Cluster of tall purple lupine flowers in the lower-right foreground of the frame.",
        ]),
        "snow": T("in a snowy landscape at first light", "Wide expanse of fresh snow with wind-sculpted drifts and a line of frosted conifers in the distance, the low sun just above the horizon tinting the snow surface pale pink and the shadows blue, a clear pale sky.", []),
        "mountain": T("on a rocky mountainside", "Steep mountainside of grey granite and scree with patches of old snow in the gullies, a deep valley falling away below with distant ridges fading to blue, an overcast sky with broken clouds.", []),
        "wetland": T("in a misty wetland at dawn", "Calm wetland of shallow water and reed beds with thin mist lying on the surface, the sun just rising on the left and laying pale orange light across the water, distant trees in dark outline.", [
            "Clump of tall brown cattails standing in the water at the left edge of the frame.",
        ]),
        "river": T("along a clear mountain river", "Clear shallow mountain river running over rounded stones, banks of spruce and alder on both sides, overcast daylight giving even soft light and a cool green-grey palette.", [
            "Mossy boulder breaking the current in the lower-left corner, small ripples curling around it.",
        ]),
        "reef": T("on a shallow coral reef", "Shallow tropical coral reef in clear turquoise water, branching corals in orange, purple and pale yellow covering the seabed, sunbeams slanting down from the rippled surface above.", [
            "School of small silver fish turning together in the upper-left corner of the frame.",
        ]),
        "kelp": T("in a kelp forest", "Tall golden-brown kelp stalks rising from a rocky seabed to the surface, shafts of daylight slanting down between them through blue-green water.", [
            "Orange garibaldi fish hovering near a kelp stalk at the right edge of the frame.",
        ]),
        "savanna": T("on the savanna in the late afternoon", "Open savanna of dry yellow grass stretching to a flat horizon, a lone flat-topped acacia tree in the middle distance, the late afternoon sun low on the right tinting the grass orange under a pale blue sky.", [
            "Pair of oxpecker birds perched on a low branch of a thorn bush in the lower-right corner of the frame.",
        ]),
        "prairie": T("on a tallgrass prairie in late summer", "Rolling tallgrass prairie of bluestem and switchgrass turning copper, scattered purple coneflowers, a wide pale blue sky with long flat clouds and clear morning light from the left.", [
            "Clump of purple coneflowers with drooping petals in the lower-left foreground of the frame.",
        ]),
        "waterhole": T("at a savanna waterhole at midday", "Muddy brown waterhole on the dry savanna with cracked earth around its edges, a few thorn trees on the far bank, hard midday sun and a hazy white-blue sky.", [
            "Group of three impalas drinking at the far edge of the waterhole in the middle distance.",
        ]),
        "ice": T("on Antarctic sea ice", "Flat white sea ice stretching to a horizon of blue-white icebergs, a low sun behind thin cloud giving soft even light, a pale grey-blue sky.", [
            "Group of penguins standing far off on the ice at the right edge of the frame, small dark figures in a loose line.",
        ]),
        "canyon": T("on the rim of a desert canyon", "Rim of a deep desert canyon with layered tan and rust rock walls falling away behind, scattered juniper shrubs on the rocky ground, late afternoon light from the right under a clear blue sky.", [
            "Twisted dead juniper trunk bleached silver-grey lying across the rocks in the lower-left corner of the frame.",
        ]),
        "lagoon": T("in a shallow tropical lagoon", "Shallow tropical lagoon over pale sand with scattered coral heads and sea grass, clear turquoise water and rippled sunlight patterns moving across the sandy bottom.", [
            "Small blue-spotted stingray resting on the sand in the lower-left corner of the frame.",
        ]),
        "desert": T("in the Sonoran desert at sunset", "Sonoran desert floor of pale sand and gravel scattered with low creosote bushes, rugged purple mountains on the horizon, the sun setting on the left and turning scattered clouds pink and orange.", [
            "Round prickly pear cactus with flat green pads and a few magenta fruits in the lower-left corner of the frame.",
        ]),
    },
)

SCENE_CATEGORIES = {
    "photography": PHOTOGRAPHY,
    "illustration": ILLUSTRATION,
    "people": PEOPLE,
    "product": PRODUCT,
    "scene": SCENE,
    "abstract": ABSTRACT,
    "architecture": ARCHITECTURE,
    "food": FOOD,
    "nature": NATURE,
}

# ------------------------------------------------------------------- design parts

# (name used in the description, background sentence, ink colour, accent colour)
PALETTES = [
    ("deep teal", "Solid deep teal background filling the entire frame with a fine paper-grain texture", "cream", "mustard yellow"),
    ("off-white", "Flat off-white background with a subtle uncoated paper texture", "black", "vermilion red"),
    ("midnight navy", "Solid midnight-navy background filling the frame", "pale cream", "coral pink"),
    ("mustard yellow", "Flat mustard-yellow background with a faint halftone dot texture", "deep navy", "white"),
    ("forest green", "Solid forest-green background with a soft matte finish", "ivory", "burnt orange"),
    ("dusty pink", "Flat dusty-pink background with a fine speckled risograph texture", "burgundy", "teal"),
    ("violet-to-pink gradient", "Smooth vertical gradient from deep violet at the top to hot pink at the bottom", "white", "lime green"),
    ("black", "Solid black background filling the frame", "white", "electric blue"),
    ("pale sky-blue", "Flat pale sky-blue background", "navy", "tomato red"),
    ("terracotta", "Solid terracotta background with a faint linen texture", "cream", "olive green"),
]

POSTER_STYLES = ["minimalist", "Swiss-style", "mid-century modern", "risograph-style", "Art Deco", "bold modernist", "retro 1970s", "Bauhaus-inspired"]
POSTER_MOTIFS = [
    "{Motif}, drawn as flat {accent} and {ink} shapes with no shading, centered in the upper two-thirds of the poster and large enough to nearly touch the side margins.",
    "{Motif}, built from simple geometric forms in {accent} with small {ink} details, placed slightly off-center in the upper half and tilted a few degrees to the right.",
    "{Motif}, cut from flat paper-like shapes in {accent} and {ink}, filling the middle of the poster above the headline with a little space around it.",
]
POSTER_HEADLINES = [
    "Large bold condensed sans-serif headline in {ink}, set across the lower third of the poster in one line, tightly tracked and spanning nearly the full width.",
    "Tall high-contrast serif headline in {ink}, centered below the main graphic on a single line with even letter spacing.",
    "Heavy geometric sans-serif headline in {ink} on one line in the lower-left area of the poster, aligned to a generous left margin.",
    "Chunky rounded retro display lettering in {ink} with a thin {accent} outline, arched gently across the lower half of the poster on one line.",
]
POSTER_SUBLINES = [
    "Small uppercase caption in {accent} with wide letter spacing, centered near the bottom edge of the poster.",
    "Small sans-serif line in {ink} set in a single row along the bottom margin, aligned left under the headline.",
    "Thin {accent} caption centered between two short horizontal rules just above the bottom edge.",
]

# (topic, headline, subline, motif)
POSTER_BRIEFS = [
    ("a summer jazz festival", "JAZZ ON THE PIER", "JULY 12 · HARBOR STAGE", "a geometric saxophone angled diagonally"),
    ("a night market", "NIGHT MARKET", "FRIDAYS FROM 6 PM", "a row of five round paper lanterns on a string"),
    ("a botanical garden exhibition", "RARE ORCHIDS", "GREENHOUSE 3 · OPEN DAILY", "a single large stylized orchid bloom"),
    ("a city marathon", "RUN THE CITY", "APRIL 27 · 42 KM", "a pair of running shoes mid-stride"),
    ("a science fiction film screening", "ORBIT 9", "ONE NIGHT ONLY", "a ringed planet with a tiny rocket circling it"),
    ("a vinyl record fair", "RECORD FAIR", "SUNDAY 10 TO 4", "a stack of three vinyl records with colored labels"),
    ("a coffee tasting workshop", "SLOW COFFEE", "TASTING CLASS · SAT 9 AM", "a pour-over coffee dripper with a single falling drop"),
    ("a mountain film festival", "SUMMIT FILMS", "MARCH 3 TO 5", "a triangular mountain peak with a small flag at the top"),
    ("a chess tournament", "OPEN CHESS CUP", "ROUND ONE AT NOON", "a tall knight chess piece in profile"),
    ("a farmers market", "FRESH EVERY SATURDAY", "MAIN SQUARE · 8 AM", "a crate of vegetables with carrots and leeks"),
    ("an astronomy night", "STAR PARTY", "TELESCOPES PROVIDED", "a brass telescope pointed at a crescent moon"),
    ("a bicycle repair day", "FIX YOUR BIKE", "FREE TOOLS · BRING A FRIEND", "a bicycle wheel crossed with a wrench"),
    ("a poetry reading", "WORDS AFTER DARK", "OPEN MIC · 8 PM", "an oversized fountain pen nib"),
    ("a surf competition", "NORTH SHORE CLASSIC", "DECEMBER 2 TO 9", "a curling wave with a small surfer on its face"),
    ("a ceramics exhibition", "CLAY & FIRE", "NEW WORK BY 12 POTTERS", "a tall round-bellied vase with a narrow neck"),
    ("a tango night", "TANGO TONIGHT", "LIVE BANDONEON TRIO", "a pair of dancing legs in red heels and black trousers"),
    ("an electronic music festival", "SIGNAL 24", "THREE STAGES · TWO DAYS", "concentric sound-wave circles spreading from the center"),
    ("a kite festival", "SKY OF KITES", "BEACH PARK · MAY 18", "three diamond-shaped kites with long ribbon tails"),
    ("a book swap", "BOOK SWAP", "BRING ONE · TAKE ONE", "an open book with its pages fanning upward"),
    ("an ice rink opening", "SKATE SEASON", "RINK OPENS DEC 1", "a single white ice skate with a long blade"),
    ("a robotics fair for children", "BUILD A ROBOT", "AGES 8 AND UP", "a friendly square-headed robot with an antenna"),
    ("a wine harvest festival", "HARVEST DAYS", "VINEYARD TOURS · LIVE MUSIC", "a bunch of grapes with two leaves"),
    ("an outdoor cinema", "MOVIES UNDER STARS", "EVERY THURSDAY", "a vintage film projector casting a beam of light"),
    ("a dog adoption day", "ADOPT A BEST FRIEND", "SHELTER OPEN HOUSE", "a sitting dog with a heart-shaped tag on its collar"),
    ("a swimming pool reopening", "THE POOL IS OPEN", "JUNE 1 · 10 AM", "a diving board above wavy water lines"),
    ("a typography conference", "TYPE MATTERS", "TALKS · WORKSHOPS · PRINT FAIR", "an oversized ampersand built from geometric shapes"),
    ("a street food festival", "STREET FEAST", "40 FOOD TRUCKS", "a food truck with a striped awning"),
    ("a climate march", "ONE PLANET", "MARCH WITH US · SEPT 20", "a globe held between two hands"),
    ("an origami workshop", "FOLD IT", "PAPER CRANE WORKSHOP", "a folded paper crane in flight"),
    ("a maritime museum", "KEEPERS OF LIGHT", "MARITIME MUSEUM", "a striped lighthouse sending out rays from its lamp"),
    ("a record release party", "BLUE HOURS", "RELEASE PARTY · FEB 9", "a trumpet with a curling line of music notes"),
    ("a hiking club", "TAKE A HIKE", "WEEKEND TRAIL GROUP", "a pair of hiking boots beside a trail marker post"),
    ("a beekeeping open day", "SAVE THE BEES", "HIVE TOURS · HONEY TASTING", "a large honeybee above a hexagon honeycomb"),
    ("a film noir retrospective", "SHADOWS AND SMOKE", "FILM NOIR WEEK", "a man in a fedora under a streetlamp"),
    ("a community theater play", "THE LAST TRAIN", "A PLAY IN TWO ACTS", "a vintage steam train leaving a tunnel"),
    ("a roller disco", "ROLLER DISCO", "SATURDAY NIGHT", "a pair of retro roller skates with striped socks"),
    ("a math olympiad", "THINK IN PRIMES", "REGIONAL OLYMPIAD", "a spiral of numbered dots"),
]

LOGO_STYLES = [
    (
        "A flat vector logo for {brand}, {business}, with {mark} above the wordmark on {a_pal} background.",
        "{Mark} as a flat {accent} vector mark with even line weight and no gradients, centered in the upper half of the frame.",
        "Clean geometric sans-serif wordmark in {ink} with generous letter spacing, centered below the mark on a single line.",
    ),
    (
        "A vintage circular badge logo for {brand}, {business}, flat graphic design with {mark} inside a ring on {a_pal} background.",
        "Round badge with a double {ink} ring border enclosing {mark} drawn in {accent} with simple linework, centered in the frame and filling about half its height.",
        "Bold slab-serif wordmark in {ink} set straight across a horizontal ribbon banner in {accent} that overlaps the lower part of the badge.",
    ),
    (
        "A minimal monoline logo for {brand}, {business}, with {mark} beside the wordmark on {a_pal} background.",
        "{Mark} drawn with one continuous thin {accent} line of uniform weight and rounded ends, placed to the left of the wordmark in the center of the frame.",
        "Light humanist sans-serif wordmark in {ink}, vertically centered to the right of the monoline mark on one line.",
    ),
    (
        "A bold modern emblem logo for {brand}, {business}, with {mark} inside a rounded square on {a_pal} background.",
        "Rounded square tile in {accent} holding {mark} cut out in the background color, centered in the upper half of the frame.",
        "Heavy rounded sans-serif wordmark in {ink} centered under the tile on one line, with tight letter spacing.",
    ),
]

# (brand, business, mark)
LOGO_BRIEFS = [
    ("NORTHWIND", "a sailing outfitter", "a compass rose with a stylized sail"),
    ("Bramble & Co", "a jam maker", "a single blackberry on a curling vine"),
    ("Atlas Freight", "a logistics company", "a globe crossed by a forward arrow"),
    ("Little Fern", "a plant nursery", "a young fern frond unfurling"),
    ("Copper Kettle", "a tea shop", "a round kettle with a curled spout"),
    ("Ridgeline", "an outdoor gear brand", "three overlapping mountain peaks"),
    ("Pixel Forge", "a video game studio", "an anvil built from square pixels"),
    ("Saltwater Surf", "a surf school", "a breaking wave inside a circle"),
    ("Quill & Ink", "a bookshop", "a feather quill dipped in an ink pot"),
    ("Orbital", "a satellite startup", "a small planet with a tilted ring"),
    ("Honeycomb Bakery", "a neighborhood bakery", "a hexagon holding a wheat stalk"),
    ("Nimbus", "a cloud hosting company", "a rounded cloud built from three circles"),
    ("Foxglove", "a florist", "a tall foxglove stem with bell-shaped blossoms"),
    ("Tidal Coffee", "a coffee roaster", "a coffee bean with a wave line through its center"),
    ("IRONCLAD", "a strength gym", "a kettlebell inside a shield shape"),
    ("Lumen Labs", "a lighting design studio", "a light bulb with a leaf-shaped filament"),
    ("Velo Club", "a cycling club", "a bicycle wheel with wings on both sides"),
    ("Wild Oat", "a granola brand", "a single oat stalk bending to the right"),
    ("Harbor Light", "a seafood restaurant", "a lighthouse beside a small fish"),
    ("Maple & Stone", "an architecture studio", "a maple leaf built from angular stone facets"),
    ("Sparrow", "a messaging app", "a simple sparrow in flight"),
    ("Bluebird Books", "a children's publisher", "a round bluebird sitting on an open book"),
    ("Kiln Studio", "a ceramics studio", "an arched kiln door with a small flame inside"),
    ("Moonbeam", "a sleep tea brand", "a crescent moon cradling a tea leaf"),
    ("Granite", "a credit union", "a solid block with a keyhole cut out of it"),
    ("Pepper Pot", "a spice merchant", "a round pot with a chili pepper handle"),
    ("EMBER", "a wood-fired pizzeria", "a single curling flame"),
    ("Summit Ski", "a ski school", "a skier carving down a slope drawn in two lines"),
    ("Octave", "a music school", "a treble clef merged with a piano key"),
    ("Greenway", "a city bus service", "a leaf shaped like a curving road"),
    ("Blue Heron Kayaks", "a kayak rental", "a heron standing on a kayak paddle"),
    ("Cobalt Code", "a software consultancy", "a pair of angle brackets forming a diamond"),
    ("Sunday Press", "a juice bar", "a halved orange with radiating segments"),
    ("Night Owl Radio", "a late-night radio station", "an owl head wearing headphones"),
    ("Tandem", "a bike repair shop", "two interlocking gears"),
    ("Pine & Pillow", "a cabin rental company", "a pine tree above a small cabin roof"),
]

# (high-level description, background, text element desc, supporting element desc)
TYPOGRAPHY_STYLES = [
    (
        "A lit neon sign of cursive lettering mounted on a dark brick wall, a night photograph with a centered composition.",
        "Dark red brick wall at night with rough grey mortar lines, lit only by the pink light of the sign, a faint pink sheen on the bricks around the letters.",
        "Cursive neon tube lettering in hot pink written in one continuous looping line across the center of the wall, thin metal mounting brackets and a clear acrylic backing visible behind the tubes.",
        "Small neon heart outline in pale blue tubing placed just after the last letter, slightly raised above the baseline of the lettering.",
    ),
    (
        "Inflated silver foil balloon letters in a row against a pastel studio backdrop, a bright party photograph.",
        "Seamless pastel lilac studio backdrop filling the frame, soft even light from the front, a few strands of curled ribbon hanging from the top edge.",
        "Puffy silver foil balloon letters, each letter inflated with slightly wrinkled seams and soft reflections, lined up in one straight row across the center with small even gaps between them.",
        "Cluster of three round balloons in pale pink and gold tied together with curled ribbon in the lower-right corner of the frame.",
    ),
    (
        "White chalk lettering on a blackboard, a close-up photograph of hand-drawn typography.",
        "Black chalkboard filling the frame with faint grey smudges of old erased chalk and a thin light wooden frame along the edges.",
        "Hand-drawn white chalk lettering in a bold serif with subtle shading on the left side of each stroke, centered on the board in one line with small flourishes at both ends.",
        "Chalk-drawn laurel branch in pale yellow curving beneath the lettering, with eight small leaves on each side of its stem.",
    ),
    (
        "Gold foil lettering stamped on a black letterpress card, a close-up photograph of printed typography.",
        "Thick black cotton card stock filling the frame with a fine felt texture, lit from the upper left so the paper fibers show.",
        "Elegant high-contrast serif lettering stamped in shiny gold foil, centered on the card in one line, each letter pressed slightly into the paper.",
        "Thin gold foil rule with small diamond-shaped ends centered below the lettering, about half as wide as the text.",
    ),
    (
        "An embroidered patch with stitched lettering sewn onto a denim jacket, a close-up textile photograph.",
        "Mid-blue denim fabric filling the frame with a visible diagonal twill weave and a line of orange topstitching along the lower edge.",
        "Lettering embroidered in thick cream satin stitch on the patch, one line centered across the middle, every letter raised and clearly legible.",
        "Oval patch in deep red twill with a raised cream stitched border, sewn onto the denim in the center of the frame behind the lettering.",
    ),
    (
        "Bubble-style graffiti lettering sprayed on a concrete wall, a street photograph.",
        "Weathered grey concrete wall with faint stains and older faded paint marks, a strip of cracked sidewalk along the bottom, overcast daylight.",
        "Large bubble-style graffiti letters in bright orange with a thick black outline and small white highlights, sprayed in one legible row across the center of the wall.",
        "Three thin drips of orange paint running down from the bottom of the letters toward the sidewalk.",
    ),
    (
        "A Swiss-style typographic print with oversized black lettering on off-white paper, flat graphic design.",
        "Flat off-white uncoated paper background filling the frame, printed with a fine grid of pale grey hairlines.",
        "Huge tightly tracked black grotesque sans-serif lettering set flush left on one line across the middle of the page, the letters almost touching.",
        "Large solid red circle behind the right half of the lettering, partly covered by the black letters.",
    ),
    (
        "Lettering written by a finger in wet sand on a beach, a bright travel photograph.",
        "Smooth wet sand filling the frame with a faint sheen, the edge of a thin wave of white foam reaching in from the upper-left corner, bright midday light.",
        "Letters drawn by a finger into the wet sand in one line across the center, each groove about two fingers wide with small ridges of sand along its edges.",
        "Small white scallop shell lying in the sand just below the last letter, its ridged side facing up.",
    ),
    (
        "Gold leaf sign painting on a shop window, a street photograph of traditional hand lettering.",
        "Large shop window with the dim interior of a shop behind the glass, wooden shelves and pendant lamps faintly visible, pale reflections of the street across the glass.",
        "Gold leaf serif lettering with a thin black outline and a dark drop shade, painted on the glass in one gentle arch across the upper half of the window.",
        "Thin gold leaf scroll ornament centered beneath the arched lettering, symmetrical on both sides.",
    ),
    (
        "Paper cut-out letters layered on a mustard background, a flat lay photograph of papercraft typography.",
        "Flat mustard-yellow paper background filling the frame, lit evenly from above with soft light.",
        "Chunky letters cut from thick white card and layered over matching teal letters offset down and to the right, arranged in one line across the center.",
        "Pair of small scissors with orange handles lying at an angle in the lower-right corner of the frame.",
    ),
    (
        "Retro chrome 3D lettering over a synthwave sunset grid, a digital illustration.",
        "Dark purple night sky fading to magenta at the horizon, a large striped orange-to-pink sun half set behind a flat plane of thin cyan grid lines receding to the horizon.",
        "Bold italic 3D lettering with a polished chrome face reflecting pink and blue bands and a thick magenta extruded side, set in one line across the upper center.",
        "Row of small white four-pointed stars scattered across the sky above the lettering.",
    ),
    (
        "Large marquee letters studded with light bulbs in a dark theater lobby, a night photograph.",
        "Dark theater lobby with a red carpeted floor and dark wood paneled walls, the only light coming from the bulbs of the letters.",
        "Large free-standing red metal marquee letters studded with rows of small round white bulbs, all lit, standing in one line across the center of the frame.",
        "Red velvet rope hanging between two brass stanchions across the lower foreground of the frame.",
    ),
    (
        "Cobalt-blue mosaic tile lettering set into a white tiled wall, a close-up photograph.",
        "Wall of small glossy white square tiles with grey grout lines filling the frame, soft even daylight.",
        "Lettering made of small square cobalt-blue mosaic tiles set flush into the white wall, in a blocky serif style on one line across the center.",
        "Border of cobalt-blue tiles forming a thin rectangular frame around the lettering, one tile wide.",
    ),
    (
        "Black brush script lettering painted on watercolor paper, a flat lay photograph of hand lettering.",
        "Sheet of cold-pressed watercolor paper filling the frame, its rough texture visible under soft daylight from the left.",
        "Flowing black brush script lettering with thick downstrokes and thin upstrokes, written in one line across the center with a gentle upward slant.",
        "Round watercolor palette with six color pans and a wet brush resting on it in the lower-right corner of the frame.",
    ),
]

TYPOGRAPHY_TEXTS = [
    "Stay Curious", "Good Things Take Time", "OPEN LATE", "Hello Sunshine", "Make It Simple",
    "Keep Going", "Less Is More", "Dream Big", "Coffee First", "Be Kind",
    "Fresh Start", "Slow Down", "Ideas Welcome", "Hold Fast", "Night Owl",
    "Take It Easy", "Happy Birthday Mia", "Welcome Home", "Brave New Day", "Say Yes",
    "Follow the Light", "Made by Hand", "Out of Office", "Rise and Shine", "Home Sweet Home",
    "Wild and Free", "Breathe In", "Thank You", "Ready Set Go", "Salt Air",
    "Rainy Days", "Better Together", "Still Here", "Just Married", "Let's Dance",
    "No Bad Days", "Small Wins", "Sweet Dreams", "Best Day Ever",
]

# (high-level description, background, text desc, supporting element desc); {language},
# {script} and {context} are filled from the brief.
MULTILINGUAL_ARTIFACTS = {
    "shop_sign": (
        "A painted wooden shop sign for {context} with {language} lettering above the doorway, a street photograph.",
        "Front of a small shop with a weathered cream plaster wall, a dark wooden doorway below the sign and a potted plant beside the door, soft overcast daylight.",
        "Large {language} lettering in {script}, painted in cream on a dark green wooden signboard that spans the shop front above the door, evenly spaced and crisp.",
        "Pair of small brass lamps mounted above the signboard and angled down toward the lettering.",
    ),
    "station_sign": (
        "A railway platform sign showing a {language} station name, a documentary photograph.",
        "Empty station platform with a concrete edge, a steel roof canopy and tracks curving away into the distance, flat overcast light.",
        "Station name in {language} {script}, printed in bold white letters on a long dark blue enamel sign hanging from the canopy on two chains, centered in the upper half of the frame.",
        "Round platform clock with a white face and black hands hanging beside the sign on the right.",
    ),
    "street_sign": (
        "A {language} street name sign mounted on a building corner, a travel photograph.",
        "Corner of an old building with pale stucco walls and a black drainpipe, a narrow street receding to the right, soft afternoon light.",
        "Street name in {language} {script} in white letters on a rectangular blue metal plate with a thin white border, screwed to the wall at eye level in the center of the frame.",
        "Black iron wall lantern mounted on the wall above the sign on the left, its glass panes clean.",
    ),
    "neon_sign": (
        "A lit neon sign with {language} lettering in the window of {context} at night, a night photograph.",
        "Dark shop window at night with the dim shapes of tables and chairs inside, raindrops on the glass, the neon light reflected as colored streaks on the wet pavement below.",
        "{language} lettering in {script} formed from bent neon tubes in bright red-pink, mounted on a clear acrylic panel in the center of the window, every stroke a continuous lit tube.",
        "Thin rectangular neon border in pale blue tubing framing the lettering on the acrylic panel.",
    ),
    "banner": (
        "A long red fabric banner for {context} with {language} lettering stretched across a street, a festive street photograph.",
        "Narrow pedestrian street lined with shop fronts and strings of small paper lanterns, crowds of people small in the distance, bright overcast daylight.",
        "Large {language} characters in {script}, printed in bold yellow along a long red fabric banner that hangs horizontally between two buildings in the upper third of the frame.",
        "Row of small triangular paper flags in white and red strung just beneath the banner across the street.",
    ),
    "greeting_card": (
        "A greeting card design with hand-lettered {language} text and small painted flowers, flat illustrated stationery.",
        "Flat pale cream card background with a subtle cotton paper texture filling the frame, no table and no room.",
        "Hand-lettered {language} greeting in {script}, drawn in dark navy brush strokes across the middle of the card, each character clearly formed.",
        "Small cluster of three painted flowers in coral and sage green placed in the lower-right corner of the card.",
    ),
    "menu_board": (
        "A chalkboard menu sign for {context} with {language} lettering, a close-up street photograph.",
        "Wooden-framed black chalkboard standing on the sidewalk outside a small restaurant, cobbled ground and an out-of-focus shop window behind it, soft daylight.",
        "{language} dish name written in {script} with white chalk in large rounded letters across the upper half of the chalkboard, clearly legible.",
        "Simple chalk drawing of a plate with a fork and knife in the lower half of the board, outlined in white and yellow chalk.",
    ),
    "calligraphy": (
        "A hanging scroll of {language} brush calligraphy on a plain wall, a quiet interior photograph.",
        "Plain pale grey plaster wall of a quiet room with the edge of a tatami floor at the bottom, soft even daylight from a paper window on the left.",
        "Bold brush calligraphy in {script}, written vertically in thick black ink down the center of the scroll, the strokes dry and textured at their ends.",
        "Long cream paper hanging scroll with a brown silk border and a wooden roller at the bottom, hanging centered on the wall.",
    ),
}

# (text, language, script, artifact, context, script group)
MULTILINGUAL_BRIEFS = [
    ("ラーメン", "Japanese", "katakana", "shop_sign", "a ramen shop", "ja"),
    ("ありがとう", "Japanese", "hiragana", "greeting_card", "a thank-you card", "ja"),
    ("東京駅", "Japanese", "kanji", "station_sign", "a railway station", "ja"),
    ("さくら祭り", "Japanese", "hiragana and kanji", "banner", "a cherry blossom festival", "ja"),
    ("喫茶店", "Japanese", "kanji", "neon_sign", "a retro coffee shop", "ja"),
    ("新年快乐", "Chinese", "simplified Chinese characters", "banner", "a Lunar New Year celebration", "zh"),
    ("茶馆", "Chinese", "simplified Chinese characters", "shop_sign", "a teahouse", "zh"),
    ("饺子", "Chinese", "simplified Chinese characters", "menu_board", "a dumpling restaurant", "zh"),
    ("書法", "Chinese", "traditional Chinese characters", "calligraphy", "a calligraphy room", "zh"),
    ("北京路", "Chinese", "simplified Chinese characters", "street_sign", "a shopping street", "zh"),
    ("안녕하세요", "Korean", "Hangul", "greeting_card", "a welcome card", "ko"),
    ("서울역", "Korean", "Hangul", "station_sign", "a railway station", "ko"),
    ("김치찌개", "Korean", "Hangul", "menu_board", "a home-style Korean restaurant", "ko"),
    ("커피", "Korean", "Hangul", "neon_sign", "a late-night cafe", "ko"),
    ("Добро пожаловать", "Russian", "Cyrillic", "banner", "a town fair", "ru"),
    ("Книги", "Russian", "Cyrillic", "shop_sign", "a bookshop", "ru"),
    ("Пекарня", "Russian", "Cyrillic", "neon_sign", "a bakery", "ru"),
    ("Невский проспект", "Russian", "Cyrillic", "street_sign", "a city avenue", "ru"),
    ("Καλημέρα", "Greek", "the Greek alphabet", "greeting_card", "a good-morning card", "el"),
    ("Ταβέρνα", "Greek", "the Greek alphabet", "shop_sign", "a seaside taverna", "el"),
    ("Αθήνα", "Greek", "the Greek alphabet", "station_sign", "a railway station", "el"),
    ("مرحبا", "Arabic", "Arabic script", "neon_sign", "a juice bar", "ar"),
    ("سوق", "Arabic", "Arabic script", "banner", "a spice market", "ar"),
    ("قهوة", "Arabic", "Arabic script", "shop_sign", "a coffee house", "ar"),
    ("שלום", "Hebrew", "the Hebrew alphabet", "greeting_card", "a greeting card", "he"),
    ("מאפייה", "Hebrew", "the Hebrew alphabet", "shop_sign", "a bakery", "he"),
    ("नमस्ते", "Hindi", "Devanagari", "greeting_card", "a welcome card", "hi"),
    ("चाय", "Hindi", "Devanagari", "shop_sign", "a roadside tea stall", "hi"),
    ("शुभ दीपावली", "Hindi", "Devanagari", "banner", "a Diwali celebration", "hi"),
    ("สวัสดี", "Thai", "Thai script", "greeting_card", "a greeting card", "th"),
    ("ตลาดน้ำ", "Thai", "Thai script", "banner", "a floating market", "th"),
    ("Bäckerei Müller", "German", "Latin letters with umlauts", "shop_sign", "a family bakery", "latn"),
    ("Frühstück", "German", "Latin letters with an umlaut", "menu_board", "a corner cafe", "latn"),
    ("Crème brûlée", "French", "Latin letters with accents", "menu_board", "a small bistro", "latn"),
    ("Café de la Gare", "French", "Latin letters with an accent", "neon_sign", "a railway cafe", "latn"),
    ("¡Buenos días!", "Spanish", "Latin letters with inverted punctuation", "greeting_card", "a good-morning card", "latn"),
    ("Panadería", "Spanish", "Latin letters with an accent", "shop_sign", "a bakery", "latn"),
    ("Dzień dobry", "Polish", "Latin letters with Polish diacritics", "greeting_card", "a greeting card", "latn"),
    ("Phở bò", "Vietnamese", "Vietnamese Latin letters with tone marks", "menu_board", "a noodle shop", "latn"),
    ("Çay Bahçesi", "Turkish", "Latin letters with Turkish diacritics", "shop_sign", "a tea garden", "latn"),
    ("Pão de Queijo", "Portuguese", "Latin letters with a tilde", "menu_board", "a Brazilian bakery", "latn"),
    ("Smørrebrød", "Danish", "Latin letters with ø", "neon_sign", "a Danish sandwich shop", "latn"),
]

# (theme name, background colour, ink colour, accent colour) for phone and desktop screens.
UI_THEMES = [
    ("light", "off-white", "near-black", "cobalt blue"),
    ("dark", "charcoal", "white", "mint green"),
    ("pastel", "pale lavender", "deep purple", "coral"),
    ("light", "pale grey", "dark navy", "tangerine orange"),
    ("dark", "deep navy", "pale grey", "sky blue"),
]
UI_TEMPLATES = {
    "p": (
        PORT_9_16,
        "A mobile app screen for {app}, clean flat UI design in a {theme} theme.",
        "Flat {bg} app background filling the frame as a single phone screen with rounded cards and generous padding, no device frame, no hands and no status bar.",
        "Screen title in a bold rounded sans-serif, {ink}, at the top left of the screen, the largest text on the screen.",
        "Bottom navigation bar with four simple {accent} line icons evenly spaced, without labels.",
    ),
    "d": (
        LAND_16_9,
        "A desktop web dashboard for {app}, clean flat UI design in a {theme} theme.",
        "Flat {bg} page background filling the frame as a full browser viewport without browser chrome, with white rounded content cards and thin borders.",
        "Page heading in a bold geometric sans-serif, {ink}, at the top left of the main content area.",
        "Narrow left sidebar in {accent} with six simple white line icons stacked vertically, without labels.",
    ),
    "w": (
        SQUARE,
        "A round smartwatch face for {app}, flat UI design on a black display.",
        "Pure black round watch display filling the frame with a thin dark grey bezel ring at its edge, no wrist and no strap.",
        "Short title in a bold condensed sans-serif, {ink}, centered in the upper third of the round display.",
        None,
    ),
}

# (app, title, template key, main component)
UI_BRIEFS = [
    ("a weather app", "Partly Cloudy", "p", "Large flat icon of a yellow sun half hidden behind a white cloud in the center of the screen, above a row of five small rounded day cards, each with a tiny weather icon."),
    ("a meditation app", "Breathe", "w", "Soft pale teal circle at the center of the display with three thin concentric rings spreading outward from it and a small round play button below."),
    ("a banking app", "Balance", "p", "Rounded payment card in deep blue in the upper middle with a small chip icon, and below it a simple green line chart curving upward across a white card."),
    ("a recipe app", "Dinner Ideas", "p", "Two-by-two grid of rounded photo cards showing a green salad, a bowl of pasta, a tomato soup and a grilled fish, each with a small heart icon in its upper-right corner."),
    ("a fitness tracker", "Daily Goal", "w", "Three concentric progress rings in red, green and blue filling the lower two-thirds of the display, the outer red ring almost complete."),
    ("a music player", "Now Playing", "p", "Large square album cover with an abstract orange and purple gradient in the center of the screen, a thin progress bar beneath it and round previous, play and next buttons."),
    ("a travel booking app", "Your Trip", "p", "Boarding pass card with a rounded outline in the middle of the screen, a small airplane icon between two dotted circles and a barcode strip along its bottom edge."),
    ("a to-do list app", "Today", "p", "Vertical list of five rounded task rows, each with a circle checkbox on the left and a grey placeholder bar instead of text, the first two circles filled with green check marks."),
    ("a plant care app", "My Plants", "p", "Two stacked rounded cards, each with a small illustration of a potted plant on the left and a blue water-drop icon above a short progress bar on the right."),
    ("a language learning app", "Lesson Complete", "p", "Cartoon trophy in gold and orange in the center of the screen surrounded by small confetti shapes, with a wide rounded green button below it that has no label."),
    ("a podcast app", "Episodes", "d", "Main area with a list of four rows, each with a square cover thumbnail in a different color on the left, grey placeholder bars for titles and a round play icon on the right."),
    ("a smart home app", "Living Room", "p", "Two-by-two grid of rounded tiles with line icons for a lamp, a thermostat, a speaker and a window blind, the lamp tile filled yellow to show it is switched on."),
    ("a calendar app", "March", "p", "Month grid of rounded day cells, seven across and five down, one cell filled with a coral circle and small colored dots under three other days, with no numbers shown."),
    ("a photo editing app", "Adjust", "p", "Large photo preview of a mountain lake in the upper half of the screen, below it a row of five round tool icons and a horizontal slider with a white knob."),
    ("a ride sharing app", "Pickup in 3 min", "p", "Simplified street map with pale grey roads filling the upper half, a blue route line ending at a small car icon, and a rounded bottom sheet with a small car illustration."),
    ("a sleep tracking app", "Good Morning", "w", "Small crescent moon icon in pale yellow above a smooth indigo area chart that curves across the lower half of the display."),
    ("a food delivery app", "Order Placed", "p", "Large green circle with a white check mark in the center of the screen, and below it a flat illustration of a delivery scooter with a red box on the back."),
    ("a note-taking app", "New Note", "d", "Wide blank white editing area with a thin cursor line at the top left and a formatting toolbar above it with bold, italic, list and link icons."),
    ("a stock trading app", "Portfolio", "d", "Large green line chart climbing from left to right over a faint grid, with a row of small pill-shaped time range buttons below it and two rounded summary cards on the right."),
    ("a parking app", "Pay Parking", "p", "Large rounded card with a blue car icon, a circular timer dial in the middle of the screen and a wide rounded blue button at the bottom that has no label."),
    ("a library app", "Due Soon", "p", "Horizontal row of three book cover cards in teal, mustard and brick red, each with a small clock icon in its corner, above a short progress bar."),
    ("an e-reader app", "Chapter Three", "p", "Page of body text shown as neat rows of thin grey placeholder lines, a slim progress bar at the bottom and a bookmark ribbon icon in the top-right corner."),
    ("a cycling app", "Ride Summary", "d", "Route map card showing a winding orange route over pale green parks and grey streets, beside three rounded stat tiles with small icons for distance, time and elevation."),
    ("a grocery app", "Your Cart", "p", "Vertical list of four rows with round product images of an apple, a milk carton, a loaf of bread and a bunch of bananas, each row with small plus and minus buttons."),
    ("a kids drawing app", "Draw!", "p", "Large white canvas card with a crayon drawing of a smiling sun above a small house, and a row of six round color swatches in rainbow colors below it."),
    ("a video call app", "Join Meeting", "d", "Grid of four rounded video tiles showing flat avatar illustrations of four different people, with a row of round microphone, camera and red hang-up buttons centered below."),
    ("a security camera app", "Front Door", "p", "Wide video preview of a porch with a wooden door and a potted plant in the upper half, a small red live dot in its corner, and a row of round control buttons below."),
    ("a focus timer app", "Focus Mode", "w", "Large circular countdown ring in orange around the edge of the display, about two-thirds full, with a small pause icon at the bottom center."),
    ("a password manager", "Vault Locked", "p", "Large padlock icon in the center of the screen inside a soft circular badge, and a round fingerprint button below it."),
    ("a concert ticket app", "Your Tickets", "p", "Stack of two ticket cards with notched edges, the front one showing a flat illustration of a stage with spotlights and a square QR code at its bottom."),
    ("a hiking map app", "Trail Map", "d", "Topographic map filling the main area with thin contour lines in pale brown and a dashed red trail line climbing to a small flag icon on a summit."),
    ("a pet care app", "Walk Time", "w", "Flat illustration of a small dog on a leash in the center of the display above a thin green progress arc along the lower edge."),
    ("an email app", "Inbox Zero", "d", "Empty inbox area with a large flat illustration of an open envelope and a paper plane in the center, and a rounded compose button in the lower-right corner."),
    ("a translation app", "Translate", "p", "Two stacked rounded text boxes filled with grey placeholder lines, a round swap-arrows button between them and a large microphone button at the bottom center."),
]

# Text-set prompts whose text lives in a photographed scene.
# (target, category, size, high-level description, background, main obj desc, text desc)
# The text element follows the main object in the element list.
SIGN_PROMPTS = [
    ("OPEN", "photography", LAND_3_2,
     "A red neon sign hanging in the window of a small diner at night, a candid street photograph.",
     "Diner window at night seen from the sidewalk, the dim interior with a chrome counter and red stools behind the glass, rain streaks on the window and a wet sidewalk below reflecting red light.",
     "Chrome napkin dispenser and a glass sugar jar standing on the counter just inside the window at the lower left.",
     "Red neon tube letters in a rounded sans-serif inside a thin blue neon rectangle, hanging from two small chains in the upper center of the window, all tubes lit."),
    ("Mike's Diner", "photography", LAND_3_2,
     "A stainless steel roadside diner with a rooftop sign at dusk, a 35mm film photograph.",
     "Gravel parking lot in front of a stainless steel roadside diner with rounded corners and a long row of windows, a deep blue dusk sky with a thin band of orange at the horizon.",
     "Turquoise 1950s sedan parked in the lot at the lower left, its chrome bumper picking up the red light of the sign.",
     "Script lettering in red neon tubes mounted on a tall white sheet-metal sign on the diner roof, one line across the sign, all letters lit."),
    ("FLOWERS", "photography", LAND_4_3,
     "A corner flower shop with a green striped awning, a morning street photograph.",
     "Corner shop front with a dark green painted wooden facade and a large window, a quiet cobbled street and soft morning daylight.",
     "Row of galvanized metal buckets on the sidewalk in front of the shop, filled with red tulips, yellow sunflowers and white roses.",
     "Large white serif capitals painted across the front flap of the green and white striped canvas awning, one line centered above the shop window."),
    ("BARBER", "photography", PORT_2_3,
     "A small barbershop front with a spiral barber pole, a candid street photograph.",
     "Narrow barbershop front with a black painted facade and a large window showing a single leather barber chair inside, a brick sidewalk and overcast midday light.",
     "Red, white and blue spiral barber pole in a glass cylinder mounted on the facade to the right of the window.",
     "Gold leaf capital letters with a thin black outline painted in one straight line across the upper part of the shop window."),
    ("NO PARKING", "photography", LAND_3_2,
     "A weathered garage door with stenciled lettering, a documentary photograph.",
     "Old corrugated metal garage door painted faded teal filling the frame, rust streaks running down from the top, a strip of cracked concrete driveway at the bottom, flat overcast light.",
     "Orange traffic cone with a white reflective band standing on the concrete in front of the door at the lower right.",
     "Large white stencil letters with the typical small bridges in each letter, painted in one line across the middle of the garage door and slightly worn at the edges."),
    ("Hotel Bellevue", "photography", LAND_4_3,
     "The entrance of an old seaside hotel with brass lettering above the door, an editorial travel photograph.",
     "Pale pink stucco facade of an old seaside hotel with tall shuttered windows and a wrought-iron balcony, a clear blue sky above and palm trunks at the edges, bright afternoon sun.",
     "Pair of large terracotta planters with clipped olive trees flanking the arched wooden entrance door.",
     "Polished brass script letters mounted on the pink wall in one line above the arched entrance, evenly spaced and clearly legible."),
    ("Happy 30th Sam", "food", SQUARE,
     "A round birthday cake with piped lettering on top, an overhead food photograph.",
     "Pale pink tablecloth filling the frame, bright even daylight from above, a scattering of colored sprinkles around the cake stand.",
     "Round two-layer cake covered in smooth white buttercream with a border of piped pink rosettes around its top edge, centered on a white cake stand.",
     "Piped chocolate script lettering in one line across the center of the white frosting on top of the cake, smooth and evenly spaced."),
    ("SOUP OF THE DAY", "food", PORT_3_4,
     "A chalkboard sign on the sidewalk outside a small cafe, a candid street photograph.",
     "Sidewalk in front of a small cafe with a green door and a window box of herbs, soft overcast daylight on grey paving stones.",
     "Wooden A-frame chalkboard standing on the sidewalk, with a simple chalk drawing of a steaming bowl in white and yellow chalk on its lower half.",
     "White chalk capital letters in a neat hand-drawn sans-serif written in one line across the upper half of the chalkboard."),
    ("FRESH BAGELS", "food", LAND_4_3,
     "A stack of white bakery boxes with printed lettering on a shop counter, a bright photograph.",
     "Bakery counter of pale wood with a glass display case of bread behind it, bright morning light from a window on the right.",
     "Stack of three white cardboard bakery boxes tied with red-and-white baker's twine, standing at the center of the counter, one open bagel box beside it showing sesame bagels.",
     "Bold red slab-serif letters printed in one line across the front of the top box, crisp and centered."),
    ("Oat Latte", "food", PORT_3_4,
     "A takeaway coffee cup with handwritten marker lettering on its sleeve, a close-up cafe photograph.",
     "Cafe counter of light grey concrete with an espresso machine out of focus in the background, soft daylight from the front.",
     "White paper takeaway coffee cup with a white plastic lid and a plain kraft cardboard sleeve, standing in the center of the counter.",
     "Handwritten black marker lettering in one line across the kraft sleeve, quick and casual but clearly legible."),
    ("LOVE", "food", SQUARE,
     "A heart-shaped sugar cookie decorated with icing lettering, an overhead food photograph.",
     "Sheet of white parchment paper on a baking tray, scattered with a few pink sprinkles, bright even daylight from above.",
     "Large heart-shaped sugar cookie flooded with smooth pale pink royal icing and outlined with a thin white border, lying in the center of the frame.",
     "White royal icing capital letters piped in one line across the middle of the cookie, slightly raised and glossy."),
    ("PUBLIC LIBRARY", "architecture", LAND_3_2,
     "The neoclassical entrance of a stone library with a carved inscription, an architectural photograph.",
     "Pale limestone neoclassical facade with four fluted columns, a wide flight of stone steps and two bronze doors, a clear blue sky and soft afternoon light.",
     "Pair of bronze double doors with rectangular panels at the top of the steps in the center of the frame, one door slightly open.",
     "Deeply carved Roman capital letters in one line across the stone frieze above the columns, evenly spaced and crisp."),
    ("CITY MUSEUM", "architecture", LAND_3_2,
     "A modern concrete museum facade with large metal letters, an architectural photograph.",
     "Smooth light grey concrete facade with a long horizontal glass entrance at ground level, a wide paved plaza in front and a pale overcast sky.",
     "Glass entrance with thin steel frames running along the base of the facade, a few small figures walking in front of it for scale.",
     "Large brushed aluminum sans-serif capital letters mounted on the concrete above the entrance in one line, each letter standing slightly off the wall."),
    ("GENERAL STORE", "architecture", PORT_2_3,
     "A faded painted advertisement on the side wall of an old brick building, a documentary photograph.",
     "Tall side wall of a two-storey red brick building in a small town, blue sky above and a gravel lot at the base, afternoon sun from the left.",
     "Faded painted rectangle in cream and dark green covering the upper half of the wall, its paint flaking and the bricks showing through in places.",
     "Large cream serif capital letters painted in one line across the faded rectangle, worn but clearly legible."),
    ("CENTRAL", "architecture", LAND_16_9,
     "A subway platform wall with a station name in mosaic tiles, a documentary photograph.",
     "Subway platform with white glazed tile walls, a dark track bed in the foreground and flat white fluorescent light.",
     "Rectangular mosaic panel with a dark green tile border set into the white tile wall in the center of the frame.",
     "Black mosaic tile capital letters in a simple serif style set in one line in the center of the bordered panel."),
    ("GRAND HOTEL", "architecture", PORT_2_3,
     "A historic hotel with large rooftop letters at night, a city photograph.",
     "Tall historic hotel of dark red brick with rows of lit windows, a deep blue night sky above the roofline and lamp-lit street below.",
     "Steel lattice frame standing on the hotel roof holding the sign letters, painted black against the night sky.",
     "Huge white capital letters outlined with small bulbs, all lit, mounted in one line on the rooftop frame."),
]

# (target, product noun, product desc, label lettering)
PRODUCT_LABELS = [
    ("RIDGE ROAST", "A matte black coffee bag", "Matte black stand-up coffee bag with a resealable zip top and a small round valve, standing upright in the center of the frame with a rectangular kraft paper label on its front.", "bold condensed black sans-serif letters printed in one line across the kraft paper label"),
    ("Olio Verde", "A tall glass bottle of olive oil", "Tall square glass bottle of green-gold olive oil with a black screw cap, standing in the center of the frame with a cream paper label wrapped around its middle.", "elegant dark green serif letters in one line centered on the cream paper label"),
    ("SOFT HANDS", "A round tin of hand cream", "Round flat aluminum tin of hand cream with a pale blue painted lid, lying flat in the center of the frame with the lid facing the viewer.", "rounded white sans-serif letters in one line centered on the pale blue lid"),
    ("FIZZ", "A tall can of sparkling water", "Tall slim aluminum can of sparkling water painted matte coral with a silver pull tab, standing upright in the center of the frame with a few drops of condensation on its side.", "large heavy white sans-serif letters printed horizontally across the middle of the can"),
    ("EARL GREY", "A cardboard box of tea", "Rectangular cardboard tea box printed in deep navy with a thin gold border, standing upright at a slight angle in the center of the frame, one tea bag with a paper tag leaning against it.", "gold serif capital letters in one line centered on the front panel of the box"),
    ("WILDFLOWER HONEY", "A hexagonal jar of honey", "Hexagonal glass jar of creamy set honey with a gold screw lid, standing in the center of the frame with a white hexagonal paper label on its front.", "small black serif letters in one line across the white hexagonal label"),
    ("OAT & MILK", "A paper-wrapped bar of soap", "Rectangular bar of soap wrapped in pale green paper and tied with a thin cotton string, lying flat in the center of the frame at a slight angle.", "dark green block letters printed in one line in the center of the paper wrapper between two thin rules"),
    ("DRAGON FIRE", "A small bottle of hot sauce", "Small slim glass bottle of dark red hot sauce with a red plastic cap, standing upright in the center of the frame with a black paper label showing a small flame illustration.", "bold white letters with jagged edges printed in one line across the black label above the flame"),
]

PRODUCT_LABEL_SETTINGS = ("backdrop", "marble", "terrazzo", "desk")

BANNED = re.compile(
    r"\b(vibrant|lush|stunning|breathtaking|mesmerizing|gorgeous|luminous|radiant|glowing|warm|bokeh|various|maybe)\b"
    r"|such as|e\.g\.|depth of field",
    re.IGNORECASE,
)


# ----------------------------------------------------------------------- assembly


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def article(word: str) -> str:
    """``word`` with the indefinite article it takes."""
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def caption(hld: str, background: str, elements: list[dict]) -> dict:
    return {
        "high_level_description": hld,
        "compositional_deconstruction": {"background": background, "elements": elements},
    }


def obj(desc: str) -> dict:
    return {"type": "obj", "desc": desc}


def text(value: str, desc: str) -> dict:
    return {"type": "text", "text": value, "desc": desc}


@dataclass
class Draft:
    category: str
    caption: dict
    size: tuple[int, int]
    target: str | None = None


def least_used(options, counts: Counter, rng: random.Random):
    """Option with the lowest use count; ties broken by a seeded shuffle."""
    order = list(options)
    rng.shuffle(order)
    return min(order, key=lambda o: counts[o])


def scene_drafts(category: str, spec: SceneCategory, subjects: list[Subject], quota: int, rng: random.Random) -> list[Draft]:
    pairs = []
    for si, subject in enumerate(subjects):
        keys = subject.only or tuple(spec.settings)
        for key in keys:
            pairs.append((si, key))
    if len(pairs) < quota:
        raise SystemExit(f"{category}: only {len(pairs)} subject/setting pairs for {quota} prompts")
    priority = {pair: rng.random() for pair in pairs}
    used: set = set()
    subject_uses: Counter = Counter()
    setting_uses: Counter = Counter()
    medium_uses: Counter = Counter()
    size_uses: Counter = Counter()
    drafts = []
    for _ in range(quota):
        si, key = min(
            (p for p in pairs if p not in used),
            key=lambda p: (subject_uses[p[0]], setting_uses[p[1]], priority[p]),
        )
        used.add((si, key))
        subject_uses[si] += 1
        setting_uses[key] += 1
        subject, setting = subjects[si], spec.settings[key]
        medium = least_used(spec.mediums, medium_uses, rng)
        medium_uses[medium] += 1
        extras = []
        if subject.extras and setting.extras:
            count = rng.choice([0, 1, 1, 2, 2])
            chosen = sorted(rng.sample(range(len(setting.extras)), min(count, len(setting.extras))))
            extras = [setting.extras[i] for i in chosen]
        hld = f"{subject.noun} {setting.phrase}, {medium}."
        size = least_used(SIZES[category], size_uses, rng)
        size_uses[size] += 1
        drafts.append(Draft(category, caption(hld, setting.background, [obj(subject.desc)] + [obj(e) for e in extras]), size))
    return drafts


def deal(items: list, quotas: dict[str, int], group_of=None) -> dict[str, list]:
    """Deal items in order to the sets, each set's share proportional to its quota.

    With ``group_of``, items are first balanced within their group (for example
    a script), so every set receives members of as many groups as it can.
    """
    if len(items) < sum(quotas.values()):
        raise SystemExit(f"need {sum(quotas.values())} briefs, have {len(items)}")
    dealt: dict[str, list] = {name: [] for name in quotas}
    in_group: Counter = Counter()
    for item in items:
        open_sets = [n for n in quotas if len(dealt[n]) < quotas[n]]
        if not open_sets:
            break
        group = group_of(item) if group_of else None
        name = min(
            open_sets,
            key=lambda n: ((in_group[n, group] + 0.5) / quotas[n], (len(dealt[n]) + 0.5) / quotas[n], n),
        )
        dealt[name].append(item)
        in_group[name, group] += 1
    return dealt


def interleave_groups(items: list, group_of) -> list:
    """Round-robin over groups (in order of first appearance), keeping order within a group."""
    groups: dict = {}
    for item in items:
        groups.setdefault(group_of(item), []).append(item)
    out = []
    while any(groups.values()):
        for members in groups.values():
            if members:
                out.append(members.pop(0))
    return out


def poster_draft(brief, with_subline: bool, rng: random.Random, counters: dict) -> Draft:
    topic, headline, subline, motif = brief
    pal = least_used(range(len(PALETTES)), counters["palette"], rng)
    counters["palette"][pal] += 1
    name, bg, ink, accent = PALETTES[pal]
    style = least_used(POSTER_STYLES, counters["style"], rng)
    counters["style"][style] += 1
    fill = {"ink": ink, "accent": accent, "Motif": cap(motif)}
    background = f"{bg}, no scene and no depth."
    if rng.random() < 0.4:
        background += f" A thin {accent} keyline border runs just inside the edges."
    elements = [
        obj(rng.choice(POSTER_MOTIFS).format(**fill)),
        text(headline, rng.choice(POSTER_HEADLINES).format(**fill)),
    ]
    if with_subline:
        elements.append(text(subline, rng.choice(POSTER_SUBLINES).format(**fill)))
    hld = f"{cap(article(style))} poster for {topic}, flat graphic design with bold typography and {motif} on {article(name)} background."
    size = least_used(SIZES["poster"], counters["size"], rng)
    counters["size"][size] += 1
    return Draft("poster", caption(hld, background, elements), size, None if with_subline else headline)


def logo_draft(brief, rng: random.Random, counters: dict) -> Draft:
    brand, business, mark = brief
    pal = least_used(range(len(PALETTES)), counters["palette"], rng)
    counters["palette"][pal] += 1
    name, bg, ink, accent = PALETTES[pal]
    style = least_used(range(len(LOGO_STYLES)), counters["style"], rng)
    counters["style"][style] += 1
    hld_t, mark_t, text_t = LOGO_STYLES[style]
    fill = {"brand": brand, "business": business, "mark": mark, "Mark": cap(mark), "ink": ink, "accent": accent}
    fill["a_pal"] = article(name)
    background = f"{bg}, a flat design field with no scene and no depth."
    elements = [obj(mark_t.format(**fill)), text(brand, text_t.format(**fill))]
    return Draft("logo", caption(hld_t.format(**fill), background, elements), SQUARE, brand)


def typography_draft(value: str, rng: random.Random, counters: dict) -> Draft:
    style = least_used(range(len(TYPOGRAPHY_STYLES)), counters["style"], rng)
    counters["style"][style] += 1
    hld, bg, text_desc, extra = TYPOGRAPHY_STYLES[style]
    elements = [text(value, text_desc)]
    if rng.random() < 0.75:
        elements.append(obj(extra))
    size = least_used(SIZES["typography"], counters["size"], rng)
    counters["size"][size] += 1
    return Draft("typography", caption(hld, bg, elements), size, value)


def multilingual_draft(brief, rng: random.Random, counters: dict) -> Draft:
    value, language, script, artifact, context, _group = brief
    hld_t, bg, text_t, extra_t = MULTILINGUAL_ARTIFACTS[artifact]
    fill = {"language": language, "script": script, "context": context}
    elements = [text(value, text_t.format(**fill))]
    extra = obj(extra_t.format(**fill))
    if artifact == "calligraphy":
        elements.insert(0, extra)  # the scroll is the main object, the writing sits on it
    elif artifact == "station_sign" or rng.random() < 0.7:
        elements.append(extra)
    if artifact == "calligraphy":
        size = PORT_2_3
    else:
        size = least_used(SIZES["multilingual_text"], counters["size"], rng)
        counters["size"][size] += 1
    return Draft("multilingual_text", caption(hld_t.format(**fill), bg, elements), size, value)


def ui_draft(brief, rng: random.Random, counters: dict) -> Draft:
    app, title, key, component = brief
    size, hld_t, bg_t, text_t, nav_t = UI_TEMPLATES[key]
    if key == "w":
        fill = {"app": app, "ink": "white", "accent": "white"}
    else:
        theme_i = least_used(range(len(UI_THEMES)), counters["theme"], rng)
        counters["theme"][theme_i] += 1
        theme, bg_color, ink, accent = UI_THEMES[theme_i]
        fill = {"app": app, "theme": theme, "bg": bg_color, "ink": ink, "accent": accent}
    elements = [text(title, text_t.format(**fill)), obj(component)]
    if nav_t:
        elements.append(obj(nav_t.format(**fill)))
    return Draft("ui", caption(hld_t.format(**fill), bg_t.format(**fill), elements), size, title)


def product_label_draft(brief, rng: random.Random, counters: dict) -> Draft:
    target, noun, desc, lettering = brief
    key = least_used(PRODUCT_LABEL_SETTINGS, counters["setting"], rng)
    counters["setting"][key] += 1
    setting = PRODUCT.settings[key]
    hld = f"{noun} {setting.phrase}, a commercial product photograph with the label facing the viewer."
    elements = [obj(desc), text(target, f"Label text in {lettering}, fully legible and facing the viewer.")]
    size = least_used(SIZES["product"], counters["size"], rng)
    counters["size"][size] += 1
    return Draft("product", caption(hld, setting.background, elements), size, target)


def sign_draft(entry) -> Draft:
    target, category, size, hld, bg, main, text_desc = entry
    return Draft(category, caption(hld, bg, [obj(main), text(target, text_desc)]), size, target)


def build() -> dict[str, list[Draft]]:
    rng = random.Random(GENERATOR_SEED)
    drafts: dict[str, list[Draft]] = {name: [] for name in SETS}

    # Scene categories: subjects split between calibration and quality.
    for category, spec in SCENE_CATEGORIES.items():
        n_cal = round(len(spec.subjects) * SCENE_QUOTA["calibration"] / sum(SCENE_QUOTA.values()))
        for _attempt in range(100):
            order = list(range(len(spec.subjects)))
            rng.shuffle(order)
            split = {"calibration": order[:n_cal], "evaluation_quality": order[n_cal:]}
            # Redraw the split until each side has enough distinct subject/setting pairs.
            if all(
                sum(len(spec.subjects[i].only or spec.settings) for i in split[name]) >= quota
                for name, quota in SCENE_QUOTA.items()
            ):
                break
        else:
            raise SystemExit(f"{category}: cannot split subjects with enough subject/setting pairs")
        for name, quota in SCENE_QUOTA.items():
            subjects = [spec.subjects[i] for i in sorted(split[name])]
            drafts[name] += scene_drafts(category, spec, subjects, quota, rng)

    # Design categories: each brief goes to exactly one set.
    def split_briefs(items, category, group_of=None):
        return deal(items, {"evaluation_text": TEXT_QUOTA[category], **DESIGN_QUOTA}, group_of)

    posters = split_briefs(POSTER_BRIEFS, "poster")
    counters = {"palette": Counter(), "style": Counter(), "size": Counter()}
    for name, briefs in posters.items():
        for brief in briefs:
            drafts[name].append(poster_draft(brief, name != "evaluation_text", rng, counters))

    logos = split_briefs(LOGO_BRIEFS, "logo")
    counters = {"palette": Counter(), "style": Counter()}
    for name, briefs in logos.items():
        drafts[name] += [logo_draft(b, rng, counters) for b in briefs]

    typo = split_briefs(TYPOGRAPHY_TEXTS, "typography")
    counters = {"style": Counter(), "size": Counter()}
    for name, values in typo.items():
        drafts[name] += [typography_draft(v, rng, counters) for v in values]

    def script(brief):
        return brief[5]

    multi = split_briefs(interleave_groups(MULTILINGUAL_BRIEFS, script), "multilingual_text", script)
    counters = {"size": Counter()}
    for name, briefs in multi.items():
        drafts[name] += [multilingual_draft(b, rng, counters) for b in briefs]

    def screen(brief):
        return brief[2]

    ui = split_briefs(interleave_groups(UI_BRIEFS, screen), "ui", screen)
    counters = {"theme": Counter()}
    for name, briefs in ui.items():
        drafts[name] += [ui_draft(b, rng, counters) for b in briefs]

    counters = {"setting": Counter(), "size": Counter()}
    drafts["evaluation_text"] += [product_label_draft(b, rng, counters) for b in PRODUCT_LABELS]
    drafts["evaluation_text"] += [sign_draft(e) for e in SIGN_PROMPTS]

    # Only the text set carries target_text.
    for name in ("calibration", "evaluation_quality"):
        for d in drafts[name]:
            d.target = None
    return drafts


def interleave(drafts: list[Draft], rng: random.Random) -> list[Draft]:
    by_category: dict[str, list[Draft]] = {}
    for d in drafts:
        by_category.setdefault(d.category, []).append(d)
    for members in by_category.values():
        rng.shuffle(members)
    ordered = {c: by_category[c] for c in CATEGORY_ORDER if c in by_category}
    return interleave_groups([d for members in ordered.values() for d in members], lambda d: d.category)


def check_caption(c: dict, where: str) -> None:
    comp = c["compositional_deconstruction"]
    hld_words = len(c["high_level_description"].split())
    if hld_words > 40:
        raise SystemExit(f"{where}: high_level_description has {hld_words} words")
    pieces = [c["high_level_description"], comp["background"]]
    for e in comp["elements"]:
        words = len(e["desc"].split())
        if not 10 <= words <= 55:
            raise SystemExit(f"{where}: element desc has {words} words: {e['desc']}")
        pieces.append(e["desc"])
    for piece in pieces:
        m = BANNED.search(piece)
        if m:
            raise SystemExit(f"{where}: avoid {m.group(0)!r}: {piece}")


def render() -> dict[str, str]:
    drafts = build()
    rng = random.Random(GENERATOR_SEED + 1)
    files = {}
    seen_prompts: set[str] = set()
    for name, (prefix, first_seed) in SETS.items():
        lines = []
        for i, d in enumerate(interleave(drafts[name], rng), start=1):
            check_caption(d.caption, f"{name} #{i}")
            prompt = json.dumps(d.caption, ensure_ascii=False, separators=(",", ":"))
            if prompt in seen_prompts:
                raise SystemExit(f"{name} #{i}: duplicate prompt")
            seen_prompts.add(prompt)
            record = {"id": f"{prefix}-{i:04d}", "category": d.category, "prompt": prompt}
            if d.target is not None:
                record["target_text"] = d.target
            record["width"], record["height"] = d.size
            record["seed"] = first_seed + i
            lines.append(json.dumps(record, ensure_ascii=False))
        files[f"{name}.jsonl"] = "\n".join(lines) + "\n"
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the files on disk instead of writing")
    parser.add_argument("--out", type=Path, default=PROMPTS, help="output folder (default: calibration_prompts/)")
    args = parser.parse_args(argv)
    files = render()
    stale = []
    for filename, content in files.items():
        path = args.out / filename
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != content:
                stale.append(filename)
        else:
            path.write_text(content, encoding="utf-8")
            print(f"wrote {path} ({content.count(chr(10))} prompts)")
    if stale:
        print("out of date: " + ", ".join(stale) + " (run calibration_prompts/make_prompts.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
